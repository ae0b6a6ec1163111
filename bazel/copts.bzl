"""Compiler options for the project's own code (third-party headers come in as -isystem)."""

ADALORA_COPTS = [
    "-Wall",
    "-Wextra",
    "-Wpedantic",
    "-Werror",
]

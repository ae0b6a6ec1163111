#!/usr/bin/env python3
"""Writes the hostile-input seeds of the JSON fuzz targets into tests/fuzz/corpus:
documents nested 100,000 deep (200 KB, too large to type), duplicate keys, NUL and other
padding, and numbers that no 64-bit integer holds. Deterministic; rerun after changing it.
Usage: tests/fuzz/make_json_seeds.py (from anywhere)."""

import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
DEEP = 100_000  # levels; max_json_depth is 64
deep = "[" * DEEP + "]" * DEEP
near_limit = "[" * 63 + "]" * 63  # the deepest array inside an object that still parses


def write(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    with open(os.path.join(ROOT, target, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def safetensors(header, data=b"", pad=b""):
    """A file from a header text, padding bytes after it (inside the header length) and data."""
    h = header.encode() + pad
    return struct.pack("<Q", len(h)) + h + data


# --- rank_pattern_json_fuzz: read_rank_pattern_json's input ------------------------------------
rp = "rank_pattern_json_fuzz"
write(rp, "deep_array.json", deep)
write(rp, "deep_value.json", '{"x.lora_E": ' + deep + "}")
write(rp, "deep_in_config.json", '{"peft_type": "ADALORA", "rank_pattern": {"x.lora_E": [' + deep + "]}}")
write(rp, "near_depth_limit.json", '{"x.lora_E": [' + near_limit[2:-2] + "]}")
write(rp, "duplicate_key.json", '{"x.lora_E": [true], "x.lora_E": [false, true]}')
write(rp, "duplicate_rank_pattern.json", '{"rank_pattern": {"q.lora_E": [true]}, "rank_pattern": null}')
write(rp, "nul_padding.json", '{"x.lora_E": [true]}\0{"y.lora_E": [false]}')
write(rp, "huge_numbers.json",
      '{"a.lora_E": 1e300, "b.lora_E": -1e19, "c.lora_E": 18446744073709551616, '
      '"d.lora_E": [18446744073709551615, -9223372036854775809]}')

# --- peft_config_fuzz: adapter_config.json ------------------------------------------------------
pc = "peft_config_fuzz"
with open(os.path.join(os.path.dirname(ROOT), "..", "data", "peft_adalora", "adapter_config.json")) as f:
    write(pc, "peft_saved.json", f.read())  # as PEFT saves it
base = {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1,
        "total_step": 10, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"model.q_proj.lora_E": [True, False, True, False]}}
write(pc, "minimal.json", '{"peft_type": "ADALORA", "total_step": 100}')
write(pc, "full.json", json.dumps(base))
write(pc, "integral_floats.json", json.dumps({**base, "init_r": 4.0, "total_step": 1e1, "lora_alpha": 2.5}))
write(pc, "target_modules_regex.json", json.dumps({**base, "target_modules": ".*\\.(q|v)_proj"}))
write(pc, "no_total_step.json", json.dumps({**base, "total_step": None, "rank_pattern": None}))
for field in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step"):
    write(pc, f"huge_{field}.json", json.dumps({**base, field: 0}).replace(f'"{field}": 0', f'"{field}": 1e300'))
write(pc, "negative_huge.json", json.dumps({**base, "tinit": 0}).replace('"tinit": 0', '"tinit": -1e19'))
write(pc, "two_to_the_64.json", json.dumps({**base, "total_step": 0}).replace(
    '"total_step": 0', '"total_step": 18446744073709551616'))
write(pc, "uint64_max.json", json.dumps({**base, "deltaT": 0}).replace(
    '"deltaT": 0', '"deltaT": 18446744073709551615'))
write(pc, "huge_alpha.json", json.dumps({**base, "lora_alpha": 0, "lora_dropout": 0}).replace(
    '"lora_alpha": 0', '"lora_alpha": 1e300').replace('"lora_dropout": 0', '"lora_dropout": -1e308'))
write(pc, "duplicate_key.json", '{"peft_type": "ADALORA", "init_r": 4, "total_step": 10, "init_r": 8}')
write(pc, "deep_other.json", '{"peft_type": "ADALORA", "total_step": 10, "loftq_config": ' + deep + "}")
write(pc, "deep_rank_pattern.json",
      '{"peft_type": "ADALORA", "total_step": 10, "init_r": 1, "rank_pattern": {"q.lora_E": ' + deep + "}}")
write(pc, "near_depth_limit.json",
      '{"peft_type": "ADALORA", "total_step": 10, "loftq_config": ' + near_limit + "}")
write(pc, "nul_padding.json", '{"peft_type": "ADALORA", "total_step": 10}\0{"init_r": 1e300}')

# --- safetensors_fuzz: adapter_model.safetensors ------------------------------------------------
st = "safetensors_fuzz"
entry = '"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
eight = bytes(range(8))
write(st, "deep_shape.safetensors",
      safetensors('{"x":{"dtype":"F32","shape":' + deep + ',"data_offsets":[0,0]}}'))
write(st, "near_depth_limit.safetensors",
      safetensors('{"x":{"dtype":"F32","shape":' + near_limit[2:-2] + ',"data_offsets":[0,0]}}'))
write(st, "nul_padding.safetensors", safetensors("{" + entry + "}", eight, b"\0garbage"))
write(st, "newline_padding.safetensors", safetensors("{" + entry + "}", eight, b"\n   "))
write(st, "space_padding.safetensors", safetensors("{" + entry + "}", eight, b"      "))
write(st, "duplicate_name.safetensors",
      safetensors("{" + entry + "," + entry.replace("[0,8]", "[8,16]") + "}", eight + eight))
write(st, "duplicate_field.safetensors",
      safetensors('{"x":{"dtype":"F32","dtype":"I32","shape":[2],"data_offsets":[0,8]}}', eight))
write(st, "duplicate_metadata.safetensors",
      safetensors('{"__metadata__":{"format":"pt","format":"np"},' + entry + "}", eight))
write(st, "huge_numbers.safetensors",
      safetensors('{"a":{"dtype":"F32","shape":[1e300],"data_offsets":[0,18446744073709551616]},'
                  '"b":{"dtype":"U8","shape":[-1e19],"data_offsets":[0,0]},'
                  '"c":{"dtype":"U8","shape":[4611686018427387904,4],"data_offsets":[0,0]}}'))
write(st, "zero_extent_huge_shape.safetensors",
      safetensors('{"z":{"dtype":"F64","shape":[0,9223372036854775807,9223372036854775807],'
                  '"data_offsets":[0,0]},' + entry + "}", eight))

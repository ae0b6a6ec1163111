#!/usr/bin/python3
"""Independent check of adalora's PEFT export, with Python and torch only (no adalora code).

Usage: check_peft_export.py DIR
DIR holds adapter_model.safetensors and adapter_config.json written by adalora, and
reference.json (tests/peft_export_writer.cpp): per module the input x and the output of the
full-rank MASKED adapter. Checks, as PEFT would see the files:
  * the safetensors container: 8-byte little-endian header length, JSON header, data_offsets
    that tile the data buffer, dtypes and byte counts (parsed by hand with struct/json; the
    `safetensors` package is used as well when it is installed);
  * keys: exactly base_model.model.<module>.lora_A / .lora_B / .lora_E per module;
  * dtypes F32; shapes (kept, in), (out, kept), (kept, 1) with kept = sum(rank_pattern);
  * adapter_config.json: peft_type ADALORA and the AdaLoraConfig fields with the right types,
    rank_pattern {"<module>.lora_E": [bool] * init_r};
  * PEFT's SVDLinear forward of the RESIZED adapter, ((x @ (A*E).T) @ B.T) * lora_alpha /
    (ranknum + 1e-5) with ranknum = init_r (PEFT's load copies the old ranknum back), equals
    the masked adapter's output.
Exits non-zero with a message on the first failure.
"""
import json
import os
import struct
import sys

import torch

PREFIX = "base_model.model."


def fail(message):
    print("check_peft_export: FAILED: " + message)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def read_safetensors(path):
    """Returns ({name: tensor}, metadata), parsing the container by hand."""
    with open(path, "rb") as f:
        raw = f.read()
    check(len(raw) >= 8, "file shorter than 8 bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    check(8 + n <= len(raw), "header length %d runs past the end" % n)
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    check(isinstance(header, dict), "header is not an object")
    data = raw[8 + n:]
    metadata = header.pop("__metadata__", {})
    sizes = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2}
    types = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}
    spans = []
    tensors = {}
    for name, entry in header.items():
        check(set(entry) == {"dtype", "shape", "data_offsets"}, "%s: fields %s" % (name, sorted(entry)))
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        check(dtype in sizes, "%s: dtype %s" % (name, dtype))
        numel = 1
        for d in shape:
            numel *= d
        check(end - begin == numel * sizes[dtype], "%s: %d bytes for shape %s %s" % (name, end - begin, shape, dtype))
        spans.append((begin, end, name))
        buf = bytearray(data[begin:end])
        t = torch.frombuffer(buf, dtype=types[dtype]) if buf else torch.empty(0, dtype=types[dtype])
        if sys.byteorder != "little":
            t = t.byteswap()
        tensors[name] = (dtype, t.reshape(shape))
    position = 0
    for begin, end, name in sorted(spans):
        check(begin == position, "%s: data_offsets begin at %d, expected %d (gap or overlap)" % (name, begin, position))
        position = end
    check(position == len(data), "tensors cover %d of %d data bytes" % (position, len(data)))
    check((8 + n) % 8 == 0, "data is not 8-byte aligned (header length %d)" % n)
    return tensors, metadata


def main():
    if len(sys.argv) != 2:
        fail("usage: check_peft_export.py DIR")
    directory = sys.argv[1]
    tensors, metadata = read_safetensors(os.path.join(directory, "adapter_model.safetensors"))
    check(metadata.get("format") == "pt", "__metadata__ %s lacks format=pt" % metadata)
    try:  # the reference reader, when present, must agree
        from safetensors.torch import load_file
        for name, t in load_file(os.path.join(directory, "adapter_model.safetensors")).items():
            check(torch.equal(t, tensors[name][1]), "safetensors package disagrees on " + name)
        print("check_peft_export: the safetensors package reads the same tensors")
    except ImportError:
        print("check_peft_export: safetensors package not installed; parsed by hand only")

    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(directory, "reference.json")) as f:
        reference = json.load(f)

    check(config.get("peft_type") == "ADALORA", "peft_type %r" % config.get("peft_type"))
    for field in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step"):
        check(isinstance(config.get(field), int) and not isinstance(config[field], bool), "%s: %r" % (field, config.get(field)))
    for field in ("beta1", "beta2", "orth_reg_weight", "lora_alpha"):
        check(isinstance(config.get(field), (int, float)), "%s: %r" % (field, config.get(field)))
    check(0 < config["beta1"] < 1 and 0 < config["beta2"] < 1, "betas")
    check(config["total_step"] > 0 and config["tinit"] < config["total_step"] - config["tfinal"], "schedule fields")
    check(isinstance(config.get("target_modules"), list), "target_modules %r" % config.get("target_modules"))
    init_r = config["init_r"]
    alpha = config["lora_alpha"]
    check(init_r == reference["init_r"] and alpha == reference["lora_alpha"], "init_r / lora_alpha differ from the reference")
    pattern = config.get("rank_pattern")
    check(isinstance(pattern, dict), "rank_pattern %r" % pattern)

    modules = reference["modules"]
    expected_keys = {PREFIX + m + s for m in modules for s in (".lora_A", ".lora_B", ".lora_E")}
    check(set(tensors) == expected_keys, "keys differ: extra %s, missing %s" % (sorted(set(tensors) - expected_keys), sorted(expected_keys - set(tensors))))
    check(set(pattern) == {m + ".lora_E" for m in modules}, "rank_pattern keys %s" % sorted(pattern))
    for m in modules:
        check(m.split(".")[-1] in config["target_modules"], "target_modules lacks %s" % m.split(".")[-1])

    worst = 0.0
    exact = 0
    total = 0
    for name, ref in modules.items():
        flags = pattern[name + ".lora_E"]
        check(isinstance(flags, list) and len(flags) == init_r and all(isinstance(b, bool) for b in flags), "%s.lora_E pattern %r" % (name, flags))
        check(flags == ref["kept"], "%s: pattern %s, reference %s" % (name, flags, ref["kept"]))
        kept = sum(flags)
        (da, a), (de, e), (db, b) = (tensors[PREFIX + name + s] for s in (".lora_A", ".lora_E", ".lora_B"))
        check(da == de == db == "F32", "%s: dtypes %s %s %s" % (name, da, de, db))
        check(list(a.shape) == [kept, ref["in"]], "%s.lora_A shape %s, expected %s" % (name, list(a.shape), [kept, ref["in"]]))
        check(list(e.shape) == [kept, 1], "%s.lora_E shape %s" % (name, list(e.shape)))
        check(list(b.shape) == [ref["out"], kept], "%s.lora_B shape %s" % (name, list(b.shape)))
        check(bool((e != 0).all()) or kept == 0, "%s: a kept singular value is zero" % name)

        x = torch.tensor(ref["x"], dtype=torch.float32)
        want = torch.tensor(ref["y_masked"], dtype=torch.float32)
        ranknum = torch.tensor(float(init_r))  # PEFT: the old ranknum, copied back on load
        y = ((x @ (a * e).T) @ b.T) * alpha / (ranknum + 1e-5)
        diff = (y - want).abs()
        tolerance = 1e-6 * (1 + want.abs())
        check(bool((diff <= tolerance).all()), "%s: resized output differs from the masked one by %g" % (name, diff.max().item()))
        worst = max(worst, diff.max().item() if diff.numel() else 0.0)
        exact += int((y == want).sum())
        total += want.numel()
    print("check_peft_export: OK: %d modules, keys/shapes/dtypes/config as PEFT writes them; resized "
          "forward equals the masked one (%d of %d outputs bit-identical, max |diff| %.3g)"
          % (len(modules), exact, total, worst))


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""Independent check of adalora's PEFT export, with Python and torch only (no adalora code).

Usage: check_peft_export.py DIR
DIR holds one folder per case (tests/peft_export_writer.cpp), each with
adapter_model.safetensors and adapter_config.json written by adalora, and reference.json: the
module names of the model the adapters belong to, and per adapted module the input x and the
output of the full-rank MASKED adapter as adalora trained it. Checks, as PEFT would see the
files, applying PEFT's own rules (its check_target_module_exists, AdaLoraLayer.update_layer,
resize_modules_by_rank_pattern, set_peft_model_state_dict and SVDLinear.forward), modelled here:
  * the safetensors container: 8-byte little-endian header length, JSON header, data_offsets
    that tile the data buffer, dtypes and byte counts (parsed by hand with struct/json; the
    `safetensors` package is used as well when it is installed);
  * adapter_config.json: peft_type ADALORA and the AdaLoraConfig fields with the right types,
    rank_pattern {"<module>.lora_E": [bool] * init_r};
  * target_modules: PEFT wraps exactly the adapted modules of the model, none of the other
    layers that share their names (a string is re.fullmatch'ed, a list matched by name or by
    "." + name at the end of the path);
  * loading: every wrapped module built at init_r (scaling = lora_alpha if > 0 else r,
    ranknum = r), then resized to sum(pattern) by the same rule with r = the kept rank, the old
    ranknum copied back when the kept rank is > 0; the file's keys then fill exactly the
    wrapped modules' lora_A / lora_E / lora_B with matching shapes and dtype: no missing and no
    unexpected key;
  * the loaded module's forward ((x @ (A*E).T) @ B.T) * scaling / (ranknum + 1e-5) equals the
    masked adapter's output, whatever lora_alpha adalora trained with (0 included).
Exits non-zero with a message on the first failure.
"""
import json
import os
import re
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


def check_config_fields(config):
    check(config.get("peft_type") == "ADALORA", "peft_type %r" % config.get("peft_type"))
    for field in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step"):
        check(isinstance(config.get(field), int) and not isinstance(config[field], bool), "%s: %r" % (field, config.get(field)))
    for field in ("beta1", "beta2", "orth_reg_weight", "lora_alpha"):
        check(isinstance(config.get(field), (int, float)) and not isinstance(config[field], bool), "%s: %r" % (field, config.get(field)))
    check(0 < config["beta1"] < 1 and 0 < config["beta2"] < 1, "betas")
    check(config["total_step"] > 0 and config["tinit"] < config["total_step"] - config["tfinal"], "schedule fields")
    check(isinstance(config.get("target_modules"), (list, str)), "target_modules %r" % config.get("target_modules"))
    check(config.get("layers_to_transform") is None and config.get("layers_pattern") is None,
          "layers_to_transform / layers_pattern must be null (PEFT refuses them with a string target_modules)")


def peft_targets(target_modules, key):
    """PEFT's check_target_module_exists, without layers_to_transform (null here)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return key in target_modules or any(key.endswith("." + t) for t in target_modules)


def check_case(directory):
    case = os.path.basename(directory)
    tensors, metadata = read_safetensors(os.path.join(directory, "adapter_model.safetensors"))
    check(metadata.get("format") == "pt", "%s: __metadata__ %s lacks format=pt" % (case, metadata))
    try:  # the reference reader, when present, must agree
        from safetensors.torch import load_file
        for name, t in load_file(os.path.join(directory, "adapter_model.safetensors")).items():
            check(torch.equal(t, tensors[name][1]), "safetensors package disagrees on " + name)
        print("check_peft_export: %s: the safetensors package reads the same tensors" % case)
    except ImportError:
        pass

    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(directory, "reference.json")) as f:
        reference = json.load(f)
    check_config_fields(config)
    init_r = config["init_r"]
    alpha = config["lora_alpha"]
    check(init_r == reference["init_r"], "%s: init_r differs from the reference" % case)
    pattern = config.get("rank_pattern")
    check(isinstance(pattern, dict), "%s: rank_pattern %r" % (case, pattern))
    modules = reference["modules"]
    dtype = reference["dtype"]
    torch_dtype = {"F32": torch.float32, "F64": torch.float64}[dtype]

    # 1. Which modules PEFT wraps: "" is the root module, which named_modules() lists too.
    wrapped = [key for key in [""] + reference["model_modules"] if peft_targets(config["target_modules"], key)]
    check(sorted(wrapped) == sorted(modules),
          "%s: PEFT would wrap %s, not exactly the adapted %s" % (case, sorted(wrapped), sorted(modules)))

    # 2. PEFT builds each wrapped module at init_r, then resizes it by the rank pattern.
    layers = {}
    for key in wrapped:
        layers[key] = {"r": init_r, "scaling": alpha if alpha > 0 else float(init_r), "ranknum": float(init_r)}
    for name, flags in pattern.items():
        check(name.endswith(".lora_E") and name[:-len(".lora_E")] in layers, "%s: rank_pattern key %s names no wrapped module" % (case, name))
        check(isinstance(flags, list) and len(flags) == init_r and all(isinstance(b, bool) for b in flags), "%s: %s pattern %r" % (case, name, flags))
        layer = layers[name[:-len(".lora_E")]]
        rank = sum(flags)
        old_ranknum = layer["ranknum"]
        layer.update(r=rank, scaling=alpha if alpha > 0 else float(rank), ranknum=float(rank))
        if rank > 0:
            layer["ranknum"] = old_ranknum  # "The scaling is exactly as the previous"

    # 3. set_peft_model_state_dict: the file's keys fill exactly the wrapped modules' parameters.
    expected_keys = {PREFIX + m + s for m in layers for s in (".lora_A", ".lora_B", ".lora_E")}
    check(set(tensors) == expected_keys, "%s: missing keys %s, unexpected keys %s" % (case, sorted(expected_keys - set(tensors)), sorted(set(tensors) - expected_keys)))

    # 4. The loaded modules compute what adalora's masked adapters did.
    worst = 0.0
    exact = 0
    total = 0
    for name, ref in modules.items():
        layer = layers[name]
        check(pattern[name + ".lora_E"] == ref["kept"], "%s: %s: pattern differs from the reference" % (case, name))
        kept = layer["r"]
        (da, a), (de, e), (db, b) = (tensors[PREFIX + name + s] for s in (".lora_A", ".lora_E", ".lora_B"))
        check(da == de == db == dtype, "%s: %s: dtypes %s %s %s, expected %s" % (case, name, da, de, db, dtype))
        check(list(a.shape) == [kept, ref["in"]], "%s: %s.lora_A shape %s, PEFT's module has %s" % (case, name, list(a.shape), [kept, ref["in"]]))
        check(list(e.shape) == [kept, 1], "%s: %s.lora_E shape %s" % (case, name, list(e.shape)))
        check(list(b.shape) == [ref["out"], kept], "%s: %s.lora_B shape %s" % (case, name, list(b.shape)))
        check(bool((e != 0).all()) or kept == 0, "%s: %s: a kept singular value is zero" % (case, name))

        x = torch.tensor(ref["x"], dtype=torch_dtype)
        want = torch.tensor(ref["y_masked"], dtype=torch_dtype)
        ranknum = torch.tensor(layer["ranknum"], dtype=torch_dtype)
        y = ((x @ (a * e).T) @ b.T) * layer["scaling"] / (ranknum + 1e-5)
        diff = (y - want).abs()
        tolerance = (1e-6 if dtype == "F32" else 1e-13) * (1 + want.abs())
        check(bool((diff <= tolerance).all()),
              "%s: %s: PEFT's loaded module differs from adalora's masked adapter by %g (scaling %g, ranknum %g)"
              % (case, name, diff.max().item(), layer["scaling"], layer["ranknum"]))
        worst = max(worst, diff.max().item() if diff.numel() else 0.0)
        exact += int((y == want).sum())
        total += want.numel()
    print("check_peft_export: OK: %s: lora_alpha %s written for %s trained, %s; PEFT wraps exactly the %d "
          "adapted of %d modules, loads every key, and its forward equals the masked one (%d of %d "
          "outputs bit-identical, max |diff| %.3g)"
          % (case, alpha, reference["trained_lora_alpha"], dtype, len(modules), len(reference["model_modules"]),
             exact, total, worst))


def main():
    if len(sys.argv) != 2:
        fail("usage: check_peft_export.py DIR")
    cases = sorted(d for d in os.listdir(sys.argv[1]) if os.path.isdir(os.path.join(sys.argv[1], d)))
    check(len(cases) > 0, "no case folders in " + sys.argv[1])
    for case in cases:
        check_case(os.path.join(sys.argv[1], case))
    print("check_peft_export: all %d cases pass" % len(cases))


if __name__ == "__main__":
    main()

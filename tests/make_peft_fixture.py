#!/usr/bin/python3
"""Writes tests/data/peft_adalora/: an AdaLoRA adapter laid out the way PEFT saves one.

PEFT itself cannot be installed here (no PyPI), so this script reproduces its save path with
torch alone (Debian's python3-torch), step by step as docs/algorithm.md §7 describes it:
  * every module is built at init_r; training masks E in place (E[~pattern] = 0);
  * get_peft_model_state_dict keeps the "lora_" keys (and, with bias="lora_only", the adapted
    modules' biases), strips the adapter name, and resize_state_dict_by_rank_pattern keeps the
    True rows of lora_A / lora_E and the True columns of lora_B (bool indexing);
  * safetensors' save_file writes an 8-byte little-endian header length, a compact JSON header
    with "__metadata__" ({"format": "pt"}) first and the tensors sorted by name (all F32 here),
    padded with spaces to a multiple of 8 bytes, then the raw little-endian bytes;
  * adapter_config.json is AdaLoraConfig.to_dict() dumped with indent=2 and sorted keys, with
    the fields a recent PEFT writes.
It also writes expected_forward.json: for a fixed input, the adapter output that PEFT's
SVDLinear computes, ((x @ (A*E).T) @ B.T) * scaling / (ranknum + 1e-5), with the FULL masked
adapter (ranknum = init_r); the script asserts that the resized one gives the same.

Run from the repository root:  /usr/bin/python3 tests/make_peft_fixture.py
"""
import json
import os
import struct

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "peft_adalora")
INIT_R = 4
ALPHA = 32
MODULES = [  # (module path, in, out, rank pattern)
    ("model.layers.0.self_attn.q_proj", 8, 6, [True, False, True, False]),
    ("model.layers.0.mlp.down_proj", 6, 8, [False, False, False, False]),  # nothing kept
    ("model.layers.1.self_attn.q_proj", 8, 6, [True, True, True, True]),  # everything kept
]


def forward(x, a, e, b, ranknum):
    return ((x @ (a * e).T) @ b.T) * ALPHA / (ranknum + 1e-5)


def save_safetensors(path, tensors, metadata):
    names = sorted(tensors)
    header = {"__metadata__": metadata}
    offset = 0
    blobs = []
    for name in names:
        t = tensors[name].contiguous()
        assert t.dtype == torch.float32
        blob = t.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def main():
    torch.manual_seed(20240611)
    os.makedirs(OUT, exist_ok=True)
    state = {}
    expected = {"init_r": INIT_R, "lora_alpha": ALPHA, "modules": {}}
    pattern = {}
    for path, fin, fout, keep in MODULES:
        a = torch.randn(INIT_R, fin) * 0.3
        e = torch.randn(INIT_R, 1)
        b = torch.randn(fout, INIT_R) * 0.3
        bias = torch.randn(fout)
        mask = torch.tensor(keep)
        e.masked_fill_(~mask.view(-1, 1), 0.0)  # RankAllocator.mask_using_rank_pattern
        ranknum = torch.tensor(float(INIT_R))
        x = torch.randn(3, fin)
        y = forward(x, a, e, b, ranknum)
        ra, re, rb = a[mask], e[mask], b[:, mask]  # resize_state_dict_by_rank_pattern
        assert torch.equal(forward(x, ra, re, rb, ranknum), y)
        prefix = "base_model.model." + path
        state[prefix + ".lora_A"] = ra
        state[prefix + ".lora_E"] = re
        state[prefix + ".lora_B"] = rb
        state[prefix + ".bias"] = bias  # bias="lora_only" saves the adapted modules' biases
        pattern[path + ".lora_E"] = keep
        expected["modules"][path] = {"x": x.tolist(), "y": y.tolist()}
    save_safetensors(os.path.join(OUT, "adapter_model.safetensors"), state, {"format": "pt"})

    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "tiny-test-model",
        "beta1": 0.85, "beta2": 0.85, "bias": "lora_only", "corda_config": None, "deltaT": 10,
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "init_r": INIT_R,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": ALPHA, "lora_bias": False, "lora_dropout": 0.0,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "orth_reg_weight": 0.5, "peft_type": "ADALORA", "r": 8, "rank_pattern": pattern,
        "revision": None, "target_modules": ["q_proj", "down_proj"], "target_r": 2,
        "task_type": "CAUSAL_LM", "tfinal": 20, "tinit": 10, "total_step": 100,
        "use_dora": False, "use_rslora": False,
    }
    with open(os.path.join(OUT, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(OUT, "expected_forward.json"), "w") as f:
        json.dump(expected, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""benchmarks/compare_torch.py's machine checks, on made-up /proc/PID/maps text: which BLAS torch
runs on, the refusal of the reference BLAS (and its override), and the CPU accounting of other
processes. Needs Debian's python3-torch (compare_torch.py imports torch); runs nothing heavy.

Usage: compare_torch_blas_test.py [PATH/TO/compare_torch.py]
"""
import ctypes
import importlib.util
import os
import sys
import unittest
from unittest import mock

SCRIPT = (sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1].endswith(".py") else
          os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks",
                       "compare_torch.py"))
spec = importlib.util.spec_from_file_location("compare_torch", SCRIPT)
ct = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ct)

LIB = "/usr/lib/x86_64-linux-gnu"


def maps(*paths):
    """/proc/PID/maps lines mapping each path, with an anonymous mapping and the stack between."""
    lines = ["7f0000000000-7f0000001000 rw-p 00000000 00:00 0 ",
             "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]"]
    for k, p in enumerate(paths):
        lines.append(f"7f{k:02x}00000000-7f{k:02x}00100000 r-xp 00000000 08:01 {1000 + k}"
                     f"                    {p}")
    return "\n".join(lines) + "\n"


class Blas(unittest.TestCase):
    def test_debian_openblas(self):
        b = ct.blas_of_maps(maps(f"{LIB}/libgomp.so.1.0.0", f"{LIB}/openblas-pthread/libblas.so.3",
                                 f"{LIB}/openblas-pthread/liblapack.so.3",
                                 f"{LIB}/openblas-pthread/libopenblasp-r0.3.21.so"))
        self.assertEqual(b["library"], "OpenBLAS")
        self.assertEqual(b["path"], f"{LIB}/openblas-pthread/libblas.so.3")
        self.assertFalse(b["reference"])
        self.assertEqual(len(b["mapped"]), 3)
        self.assertIsNone(ct.blas_warning(b, allow_reference=False))

    def test_debian_reference_is_refused_unless_allowed(self):
        b = ct.blas_of_maps(maps(f"{LIB}/blas/libblas.so.3.11.0",
                                 f"{LIB}/lapack/liblapack.so.3.11.0"))
        self.assertEqual(b["library"], "reference")
        self.assertTrue(b["reference"])
        with self.assertRaises(SystemExit) as e:
            ct.blas_warning(b, allow_reference=False)
        self.assertIn("--allow-reference-blas", str(e.exception.code))
        self.assertIn("REFERENCE BLAS", ct.blas_warning(b, allow_reference=True))

    def test_reference_libblas_wins_over_an_implementation_beside_it(self):
        # libtorch calls the libblas.so.3 it needs, whatever another library pulled in.
        b = ct.blas_of_maps(maps(f"{LIB}/openblas-pthread/libopenblasp-r0.3.21.so",
                                 f"{LIB}/blas/libblas.so.3.11.0"))
        self.assertTrue(b["reference"])
        self.assertEqual(b["path"], f"{LIB}/blas/libblas.so.3.11.0")

    def test_other_implementations(self):
        for path, name in ((f"{LIB}/blis-openmp/libblas.so.3", "BLIS"),
                           (f"{LIB}/atlas/libblas.so.3.10.3", "ATLAS"),
                           ("/opt/intel/oneapi/mkl/lib/libmkl_rt.so.2", "MKL"),
                           ("/usr/lib64/libflexiblas_openblas-openmp.so",
                            "FlexiBLAS (openblas-openmp)")):
            b = ct.blas_of_maps(maps(path))
            self.assertEqual(b["library"], name, path)
            self.assertFalse(b["reference"], path)

    def test_flexiblas_netlib_backend_is_reference(self):
        b = ct.blas_of_maps(maps("/usr/lib64/libflexiblas.so.3.3",
                                 "/usr/lib64/flexiblas/libflexiblas_netlib.so"))
        self.assertTrue(b["reference"])

    def test_nothing_mapped(self):
        b = ct.blas_of_maps(maps(f"{LIB}/libgomp.so.1.0.0", f"{LIB}/lapack/liblapack.so.3.11.0",
                                 "/usr/lib/python3/dist-packages/torch/lib/libtorch_cpu.so"))
        self.assertEqual(b, {"library": None, "path": None, "reference": False, "mapped": []})
        self.assertIsNone(ct.blas_warning(b, allow_reference=False))

    def test_main_refuses_before_running_anything(self):
        reference = ct.blas_of_maps(maps(f"{LIB}/blas/libblas.so.3.11.0"))
        argv = ["compare_torch.py", "--binary", "/nonexistent/adalora_bench"]
        with mock.patch.object(ct, "torch_blas", return_value=reference), \
                mock.patch.object(ct, "run_binary", side_effect=AssertionError("ran")), \
                mock.patch.object(sys, "argv", argv):
            with self.assertRaises(SystemExit) as e:
                ct.main()
        self.assertIn("reference BLAS", str(e.exception.code))


class BlasThreads(unittest.TestCase):
    def test_no_setter_without_a_known_library(self):
        self.assertIsNone(ct.blas_thread_setter({"library": None, "path": None}))
        self.assertIsNone(ct.blas_thread_setter({"library": "reference",
                                                 "path": f"{LIB}/blas/libblas.so.3"}))
        # A library that does not load gives no setter rather than an error.
        self.assertIsNone(ct.blas_thread_setter({"library": "OpenBLAS",
                                                 "path": "/nonexistent/libopenblas.so.0"}))

    def test_openblas_follows_the_setter(self):
        # On this process's own torch: the setter must change OpenBLAS's thread count, which
        # torch.set_num_threads does not (the reason the setter exists).
        blas = ct.torch_blas()
        if blas["library"] != "OpenBLAS":
            self.skipTest(f"torch runs on {blas['library']}, not OpenBLAS")
        lib = ctypes.CDLL(blas["path"])
        lib.openblas_get_num_threads.restype = ctypes.c_int
        before = lib.openblas_get_num_threads()
        setter = ct.blas_thread_setter(blas)
        self.assertIsNotNone(setter)
        try:
            ct.torch.set_num_threads(2)
            setter(1)
            self.assertEqual(lib.openblas_get_num_threads(), 1)
            setter(before)
            self.assertEqual(lib.openblas_get_num_threads(), before)
        finally:
            setter(before)


class Cpu(unittest.TestCase):
    def test_other_processes(self):
        before = {"time": 100.0, "busy": 1000.0, "steal": 5.0, "own": 10.0}
        after = {"time": 110.0, "busy": 1018.0, "steal": 5.5, "own": 25.0}
        used = ct.cpu_used(before, after)
        self.assertAlmostEqual(used["other_cpu_s"], 3.0)  # 18 s busy, 15 s ours
        self.assertAlmostEqual(used["other_share"], 0.3)
        self.assertAlmostEqual(used["steal_share"], 0.05)

    def test_tick_rounding_below_zero_is_zero(self):
        before = {"time": 0.0, "busy": 0.0, "steal": 0.0, "own": 0.0}
        after = {"time": 10.0, "busy": 19.98, "steal": 0.0, "own": 20.0}
        self.assertEqual(ct.cpu_used(before, after)["other_share"], 0.0)

    def test_snapshot_counts_own_work(self):
        s0 = ct.cpu_snapshot()
        t = ct.time.process_time() + 0.2
        while ct.time.process_time() < t:
            pass
        used = ct.cpu_used(s0, ct.cpu_snapshot())
        self.assertGreaterEqual(used["own_cpu_s"], 0.15)
        self.assertGreaterEqual(used["other_cpu_s"], 0.0)


if __name__ == "__main__":
    unittest.main()

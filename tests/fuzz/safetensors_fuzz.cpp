// libFuzzer target: arbitrary bytes as a safetensors file (PEFT's adapter_model.safetensors),
// read as adalora::safetensors_file reads one and then imported as PEFT adapters. Build and run
// with tests/fuzz/run_fuzzers.sh; seeds in tests/fuzz/corpus/safetensors_fuzz.
//
// Must never crash, leak, read out of bounds or trip a sanitizer. A malformed file is refused
// with std::invalid_argument; any other exception escapes and libFuzzer reports it. A file that
// parses must give every floating-point tensor's values, survive a write/read round trip with the
// same tensors and bytes, and import as adapters or be refused with std::invalid_argument.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "adalora/io/peft_adapter.hpp"
#include "adalora/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> bytes(size);
  if (size != 0) std::memcpy(bytes.data(), data, size);
  try {
    const adalora::safetensors_file file(std::move(bytes), "fuzz");
    adalora::safetensors_writer writer;
    for (const auto& t : file.tensors()) {
      if (t.dtype == adalora::st_dtype::F32 || t.dtype == adalora::st_dtype::F64 ||
          t.dtype == adalora::st_dtype::F16 || t.dtype == adalora::st_dtype::BF16)
        (void)file.values<double>(t.name);
      const auto raw = file.raw(t);
      writer.add_raw(t.name, t.dtype, t.shape, std::vector<std::byte>(raw.begin(), raw.end()));
    }
    for (const auto& [key, value] : file.metadata()) writer.set_metadata(key, value);
    const adalora::safetensors_file again(writer.serialize(), "fuzz round trip");
    if (again.tensors().size() != file.tensors().size() || again.metadata() != file.metadata()) {
      std::fprintf(stderr, "fuzz: a safetensors round trip changed the tensor list\n");
      std::abort();
    }
    for (const auto& t : file.tensors()) {
      const auto& u = again.at(t.name);
      const auto a = file.raw(t), b = again.raw(u);
      if (u.dtype != t.dtype || u.shape != t.shape || a.size() != b.size() ||
          (a.size() != 0 && std::memcmp(a.data(), b.data(), a.size()) != 0)) {
        std::fprintf(stderr, "fuzz: a safetensors round trip changed tensor '%s'\n", t.name.c_str());
        std::abort();
      }
    }
    adalora::peft_adalora_config config;
    config.init_r = 4;
    config.total_step = 10;
    try {
      (void)adalora::peft_adapter_from<float>(file, config);
    } catch (const std::invalid_argument&) {
    }
  } catch (const std::invalid_argument&) {
  }
  return 0;
}

// Catch2 main for every test binary. Under `bazel test` it also writes a JUnit report to
// $XML_OUTPUT_FILE, so that Bazel's test.xml holds one entry per Catch2 test case and CI can
// count real test cases rather than binaries.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char* argv[]) {
  std::vector<char*> args(argv, argv + argc);
  std::string reporter = "--reporter=junit";
  std::string out;
  const char* xml = std::getenv("XML_OUTPUT_FILE");
  if (xml != nullptr && *xml != '\0') {
    out = std::string("--out=") + xml;
    args.push_back(reporter.data());
    args.push_back(out.data());
  }
  return Catch::Session().run(static_cast<int>(args.size()), args.data());
}

// corpus.hpp: WordNet reading and its errors, the fixed split rule, gzip reading, GCIDE
// paragraphs, the tokenizer, the vocabulary and the overlap filter, on small synthetic inputs
// whose expected results follow from the formats' definitions. One hidden test ("[.real]")
// reads the installed WordNet and GCIDE and prints their statistics.

#include <catch2/catch.hpp>

#include <zlib.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "examples/transformer/corpus.hpp"

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using transformer::split;

/// A fresh directory under the system's temporary directory, removed at the end of the scope.
struct temp_dir {
  fs::path path;
  temp_dir() {
    std::random_device entropy;
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    path = fs::temp_directory_path() /
           ("corpus_test_" + std::to_string(stamp) + "_" + std::to_string(entropy()));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
};

void write_file(const fs::path& file, const std::string& content) {
  std::ofstream out(file, std::ios::binary);
  out << content;
  REQUIRE(out.good());
}

// WordNet's license header lines start with two spaces.
const std::string license = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
                            "  2 Princeton University under the following license.  \n";

std::map<std::string, std::string> valid_wordnet_files() {
  return {
      {"data.noun",
       license +
           "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 | that which "
           "is perceived or known or inferred to have its own distinct existence (living or nonliving)  \n"
           "00001930 03 n 01 physical_entity 0 001 @ 00001740 n 0000 | an entity that has physical existence  \n"
           "06000000 10 n 01 pipe_symbol 0 000 | the character | used in shells; \"ls | wc\"  \n"},
      {"data.verb", license +
                        "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 001 + 00831191 n 0103 "
                        "02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs  \n"
                        "00002325 29 v 01 respire 1 000 01 + 02 00 | undergo the biomedical process  \n"},
      {"data.adj", license +
                       "00001740 00 a 01 able 0 001 ! 00002098 a 0101 | (usually followed by `to') having the "
                       "necessary means  \n"
                       "00003553 00 s 02 emergent 0 emerging 0 001 & 00003356 a 0000 | coming into existence; "
                       "\"an emergent republic\"  \n"
                       "01500000 44 a 01 abloom 0 000 | in flower  \n"},
      {"data.adv", license + "00001740 02 r 01 a_cappella 0 000 | without musical accompaniment  \n"},
  };
}

void write_wordnet(const fs::path& dir, const std::map<std::string, std::string>& files) {
  for (const auto& [name, content] : files) write_file(dir / name, content);
}

/// FNV-1a, 64 bits, written from its definition (independently of corpus.hpp).
std::uint64_t reference_fnv1a(const std::string& key) {
  std::uint64_t hash = 14695981039346656037ULL;
  for (const unsigned char byte : key) {
    hash ^= byte;
    hash *= 1099511628211ULL;
  }
  return hash;
}

split reference_split(const std::string& key) {
  const std::uint64_t bucket = reference_fnv1a(key) % 10;
  return bucket < 8 ? split::train : bucket == 8 ? split::validation : split::test;
}

std::vector<std::string> tokens(std::initializer_list<const char*> list) { return {list.begin(), list.end()}; }

}  // namespace

TEST_CASE("read_wordnet reads the four data files in order, skipping the license header", "[corpus]") {
  temp_dir dir;
  write_wordnet(dir.path, valid_wordnet_files());
  const std::vector<transformer::synset> synsets = transformer::read_wordnet(dir.path);
  REQUIRE(synsets.size() == 9);

  CHECK(synsets[0].pos == 'n');
  CHECK(synsets[0].file_pos == 'n');
  CHECK(synsets[0].offset == 1740);
  CHECK(synsets[0].lexfile == 3);
  CHECK(synsets[0].gloss ==
        "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)");
  // Only the first " | " separates; the rest belongs to the gloss.
  CHECK(synsets[2].gloss == "the character | used in shells; \"ls | wc\"");
  CHECK(synsets[2].offset == 6000000);
  CHECK(synsets[2].lexfile == 10);

  CHECK(synsets[3].file_pos == 'v');
  CHECK(synsets[3].lexfile == 29);
  CHECK(synsets[3].gloss == "draw air into, and expel out of, the lungs");
  CHECK(synsets[4].offset == 2325);

  CHECK(synsets[5].pos == 'a');
  CHECK(synsets[6].pos == 's');       // a satellite keeps its ss_type...
  CHECK(synsets[6].file_pos == 'a');  // ...but lives in data.adj
  CHECK(synsets[6].gloss == "coming into existence; \"an emergent republic\"");
  CHECK(synsets[7].lexfile == 44);
  CHECK(transformer::lexfile_names[static_cast<std::size_t>(synsets[7].lexfile)] == "adj.ppl");

  CHECK(synsets[8].pos == 'r');
  CHECK(synsets[8].file_pos == 'r');
  CHECK(synsets[8].lexfile == 2);
  CHECK(synsets[8].gloss == "without musical accompaniment");
}

TEST_CASE("read_wordnet names the file and line of a malformed synset line", "[corpus]") {
  struct bad_case {
    const char* file;
    std::string line;
    const char* says;
  };
  const std::vector<bad_case> cases = {
      {"data.verb", "00003000 2x v 01 bad 0 000 | non-numeric lexfile  \n", "lex_filenum"},
      {"data.verb", "00003000 45 v 01 bad 0 000 | lexfile too large  \n", "outside 0..44"},
      {"data.verb", "00003000 290 v 01 bad 0 000 | three digits  \n", "lex_filenum"},
      {"data.verb", "00003000 29 v 01 bad 0 000 no gloss separator  \n", "' | '"},
      {"data.verb", "00003000 29 n 01 bad 0 000 | a noun in the verb file  \n", "ss_type"},
      {"data.verb", "0000x000 29 v 01 bad 0 000 | bad offset  \n", "offset"},
      {"data.verb", "00003000 29 v zz bad 0 000 | bad word count  \n", "w_cnt"},
      {"data.verb", "00003000\n", "lex_filenum"},
  };
  for (const bad_case& c : cases) {
    CAPTURE(c.line);
    temp_dir dir;
    std::map<std::string, std::string> files = valid_wordnet_files();
    files[c.file] += c.line;  // line 2 (license) + 2 synsets + this one = line 5
    write_wordnet(dir.path, files);
    REQUIRE_THROWS_AS(transformer::read_wordnet(dir.path), std::runtime_error);
    REQUIRE_THROWS_WITH(transformer::read_wordnet(dir.path), Contains("data.verb:5:") && Contains(c.says));
  }

  SECTION("a satellite outside data.adj") {
    temp_dir dir;
    std::map<std::string, std::string> files = valid_wordnet_files();
    files["data.noun"] = "00001740 03 s 01 entity 0 000 | wrong file\n";
    write_wordnet(dir.path, files);
    REQUIRE_THROWS_WITH(transformer::read_wordnet(dir.path), Contains("data.noun:1:") && Contains("ss_type"));
  }
  SECTION("a missing file names the file and the Debian package") {
    temp_dir dir;
    std::map<std::string, std::string> files = valid_wordnet_files();
    files.erase("data.adv");
    write_wordnet(dir.path, files);
    REQUIRE_THROWS_WITH(transformer::read_wordnet(dir.path), Contains("data.adv") && Contains("wordnet-base"));
  }
}

TEST_CASE("fnv1a64 matches FNV-1a's definition and published values", "[corpus]") {
  CHECK(transformer::fnv1a64("") == 14695981039346656037ULL);
  CHECK(transformer::fnv1a64("a") == 0xaf63dc4c8601ec8cULL);  // the FNV reference test vector
  CHECK(transformer::fnv1a64("n:00001740") == reference_fnv1a("n:00001740"));
  CHECK(reference_fnv1a("n:00001740") == 6735889452028699721ULL);  // computed separately, in Python
  CHECK(transformer::fnv1a64("b:", transformer::fnv1a64("ab")) == reference_fnv1a("abb:"));
}

TEST_CASE("split_of hashes the file's part of speech and the zero-padded offset", "[corpus]") {
  // "n:00001740": FNV-1a = 6735889452028699721, % 10 = 1: train.
  CHECK(transformer::split_of('n', 1740) == split::train);
  // The satellite 00003553 in data.adj: "a:00003553" % 10 = 2 (train), whereas "s:00003553" would
  // give 8 (validation). So using ss_type instead of the file's letter would fail here.
  CHECK(reference_split("a:00003553") == split::train);
  CHECK(reference_split("s:00003553") == split::validation);
  const transformer::synset satellite{'s', 'a', 3553, 0, "coming into existence"};
  CHECK(transformer::split_of(satellite) == split::train);

  // Agrees with the reference on many identities, padding included.
  const std::array<char, 4> parts = {'n', 'v', 'a', 'r'};
  std::array<int, 3> counts{};
  const int total = 100000;
  for (int i = 0; i < total; ++i) {
    const char pos = parts[static_cast<std::size_t>(i % 4)];
    const std::int64_t offset = 1740 + std::int64_t{i} * 53;
    std::string digits = std::to_string(offset);
    digits.insert(0, 8 - digits.size(), '0');
    const split expected = reference_split(std::string(1, pos) + ":" + digits);
    const split got = transformer::split_of(pos, offset);
    if (got != expected) FAIL("split_of disagrees with the reference at " << pos << ":" << digits);
    ++counts[static_cast<std::size_t>(got)];
  }
  CHECK(std::abs(counts[0] - 80000) <= 1000);
  CHECK(std::abs(counts[1] - 10000) <= 1000);
  CHECK(std::abs(counts[2] - 10000) <= 1000);
  // Offsets wider than 8 digits are not truncated.
  CHECK(transformer::split_of('n', 123456789) == reference_split("n:123456789"));

  CHECK_THROWS_AS(transformer::split_of('s', 3553), std::invalid_argument);
  CHECK_THROWS_AS(transformer::split_of('n', -1), std::invalid_argument);
}

TEST_CASE("read_gzip round-trips, enforces its size limit and reports bad files", "[corpus]") {
  temp_dir dir;
  // 2.5 MB of mixed bytes (zeros included): more than one of read_gzip's 1 MiB chunks.
  std::string original;
  std::mt19937 rng(7);
  for (int i = 0; i < 2'500'000; ++i) original += static_cast<char>(i % 3 == 0 ? 0 : rng() % 64);
  const fs::path file = dir.path / "data.gz";
  {
    gzFile gz = gzopen(file.string().c_str(), "wb");
    REQUIRE(gz != nullptr);
    REQUIRE(gzwrite(gz, original.data(), static_cast<unsigned>(original.size())) ==
            static_cast<int>(original.size()));
    REQUIRE(gzclose(gz) == Z_OK);
  }
  CHECK(transformer::read_gzip(file) == original);
  CHECK(transformer::read_gzip(file, original.size()) == original);  // exactly at the limit
  CHECK_THROWS_WITH(transformer::read_gzip(file, original.size() - 1),
                    Contains("data.gz") && Contains("more than 2499999 bytes"));
  CHECK_THROWS_WITH(transformer::read_gzip(file, 1000), Contains("more than 1000 bytes"));

  SECTION("empty") {
    const fs::path empty = dir.path / "empty.gz";
    gzFile gz = gzopen(empty.string().c_str(), "wb");
    REQUIRE(gz != nullptr);
    REQUIRE(gzclose(gz) == Z_OK);
    CHECK(transformer::read_gzip(empty).empty());
  }
  SECTION("missing") {
    CHECK_THROWS_WITH(transformer::read_gzip(dir.path / "absent.dict.dz"), Contains("absent.dict.dz"));
  }
  SECTION("truncated") {
    std::ifstream in(file, std::ios::binary);
    std::string compressed((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const fs::path cut = dir.path / "cut.gz";
    write_file(cut, compressed.substr(0, compressed.size() / 2));
    CHECK_THROWS_AS(transformer::read_gzip(cut), std::runtime_error);
  }
}

TEST_CASE("gcide_paragraphs drops the header and tag-only lines and joins lines", "[corpus]") {
  // The shape of gcide.dict.dz's text: dictd header entries, a license preamble that ends in a
  // quotation glued to the first entry, then entries whose paragraphs are separated by blank lines.
  const std::string text =
      "\n\n00-database-url\n   ftp://ftp.example.org/dictionary\n\n"
      "00-database-short\n   A Small Test Dictionary v.0.1\n\n"
      "00-database-info\n   This file was converted on a Tuesday.\n\n"
      "The original data was distributed with the notice shown below.\n\n"
      " Begin file 1 of 2:  Letter A \n        \n"
      "This dictionary is free software; see the license.\n"
      "  * * * * * * * * * *\n\n"
      "      Too many hands are needed for this.     --Someone.\n"
      "Ab \\Ab\\, n. [Heb.]\n"
      "   The eleventh month of the Jewish year.\n"
      "   [1913 Webster]\n"
      "\n"
      "   2. A second sense. [R.]\n"
      "      [Obs.]\n"
      "      [1913 Webster]\n"
      "\n"
      "   [WordNet 1.5 +PJC]\n"
      "   [PJC]\n"
      " \t \n"
      "Zythum \\Zy\"thum\\ (z[i^]\"th[u^]m), n.\n"
      "   A kind of [ancient] beer. \n"
      "   [Written also {zythem}.]\n"
      "   [root]240.]\n"
      "   [1913 Webster]";
  const std::vector<std::string> paragraphs = transformer::gcide_paragraphs(text);
  const std::vector<std::string> expected = {
      "Ab \\Ab\\, n. [Heb.] The eleventh month of the Jewish year.",
      "2. A second sense. [R.]",
      "Zythum \\Zy\"thum\\ (z[i^]\"th[u^]m), n. A kind of [ancient] beer. [root]240.]",
  };
  CHECK(paragraphs == expected);

  CHECK(transformer::gcide_paragraphs("0 \\0\\ adj.\r\n   1. zero\r\n\r\n   [WordNet 1.5]\r\n") ==
        std::vector<std::string>{"0 \\0\\ adj. 1. zero"});
  CHECK_THROWS_AS(transformer::gcide_paragraphs("00-database-url\n   ftp://x\n\nno entries here\n"),
                  std::invalid_argument);
  CHECK_THROWS_AS(transformer::gcide_paragraphs(""), std::invalid_argument);
}

TEST_CASE("words: maximal runs of ASCII letters (lowercased) or of digits", "[corpus]") {
  CHECK(transformer::words("Af*fat\"u*ate\\") == tokens({"af", "fat", "u", "ate"}));
  CHECK(transformer::words("{Afeard}") == tokens({"afeard"}));
  CHECK(transformer::words("[1913 Webster]") == tokens({"1913", "webster"}));
  CHECK(transformer::words("caf\xe9 au lait") == tokens({"caf", "au", "lait"}));
  CHECK(transformer::words("\xc3\xa9t\xc3\xa9") == tokens({"t"}));  // UTF-8 "été"
  CHECK(transformer::words("1st-class ABC123def") == tokens({"1", "st", "class", "abc", "123", "def"}));
  CHECK(transformer::words("z[i^]\"th[u^]m") == tokens({"z", "i", "th", "u", "m"}));
  CHECK(transformer::words("").empty());
  CHECK(transformer::words(" \t--;\x80\xff").empty());
  CHECK(transformer::words(std::string_view("a\0b", 3)) == tokens({"a", "b"}));
}

TEST_CASE("vocabulary: specials, then descending count, ties by byte order", "[corpus]") {
  transformer::word_counter counter;
  counter.add_text("The b, the A; THE ab. b a c");
  CHECK(counter.total() == 9);
  CHECK(counter.distinct() == 5);
  CHECK(counter.count("the") == 3);
  CHECK(counter.count("zzz") == 0);

  const auto vocab = transformer::vocabulary::from_counts(counter, 100);
  REQUIRE(vocab.size() == 9);
  CHECK(vocab.word(transformer::vocabulary::pad) == "[PAD]");
  CHECK(vocab.word(transformer::vocabulary::unk) == "[UNK]");
  CHECK(vocab.word(transformer::vocabulary::mask) == "[MASK]");
  CHECK(vocab.word(transformer::vocabulary::cls) == "[CLS]");
  // the:3, then a:2 before b:2, then ab:1 before c:1.
  CHECK(vocab.word(4) == "the");
  CHECK(vocab.word(5) == "a");
  CHECK(vocab.word(6) == "b");
  CHECK(vocab.word(7) == "ab");
  CHECK(vocab.word(8) == "c");
  CHECK(vocab.id("ab") == 7);
  CHECK(vocab.id("zebra") == transformer::vocabulary::unk);
  CHECK(vocab.id("[PAD]") == transformer::vocabulary::unk);
  CHECK(vocab.id("The") == transformer::vocabulary::unk);  // id() takes tokenizer output
  CHECK(vocab.encode("The zebra, ab!") == std::vector<std::int32_t>{4, 1, 7});
  CHECK_THROWS_AS(vocab.word(9), std::out_of_range);
  CHECK_THROWS_AS(vocab.word(-1), std::out_of_range);

  const auto small = transformer::vocabulary::from_counts(counter, 6);
  REQUIRE(small.size() == 6);
  CHECK(small.word(5) == "a");
  CHECK(small.id("b") == transformer::vocabulary::unk);
  CHECK(transformer::vocabulary::from_counts(counter, 100, 2).size() == 7);
  CHECK(transformer::vocabulary::from_counts(counter, 4).size() == 4);
  CHECK_THROWS_AS(transformer::vocabulary::from_counts(counter, 3), std::invalid_argument);
  CHECK_THROWS_AS(transformer::vocabulary::from_ordered_words({"a", "b", "a"}), std::invalid_argument);

  // The checksum: CRC-32 of "[PAD]\n[UNK]\n[MASK]\n[CLS]\nthe\na\n" (computed separately, in Python).
  const auto the_a = transformer::vocabulary::from_ordered_words({"the", "a"});
  CHECK(the_a.checksum() == 425390011U);
  CHECK(the_a.checksum() == small.checksum());
  CHECK(transformer::vocabulary::from_ordered_words({"the", "b"}).checksum() != the_a.checksum());
  CHECK(transformer::vocabulary::from_ordered_words({"a", "the"}).checksum() != the_a.checksum());
  CHECK(transformer::vocabulary::from_ordered_words({"ab", "c"}).checksum() !=
        transformer::vocabulary::from_ordered_words({"a", "bc"}).checksum());
  CHECK(transformer::vocabulary::from_counts(counter, 100).checksum() == vocab.checksum());
}

TEST_CASE("overlap_filter finds protected glosses inside paragraphs", "[corpus]") {
  transformer::overlap_filter filter;
  CHECK_FALSE(filter.overlaps(transformer::words("anything at all")));
  // A 10-word gloss: its 3 eight-word windows are stored.
  filter.add(transformer::words("a member of the genus Canis that has been domesticated"));
  filter.add(transformer::words("not able"));
  CHECK(filter.size() == 4);

  // Words 2..9 of the long gloss, inside a longer paragraph.
  CHECK(filter.overlaps(transformer::words("Dog, n. 1. Member of the genus Canis that has been "
                                           "domesticated since prehistoric times.")));
  CHECK(filter.overlaps(transformer::words("member of the genus canis that has been")));  // exactly 8
  // Only 7 consecutive words in common: not flagged.
  CHECK_FALSE(filter.overlaps(transformer::words("Dog, a member of the genus Canis that is tame.")));
  CHECK_FALSE(filter.overlaps(transformer::words("of the genus Canis that has been")));
  // The short gloss as a contiguous run, anywhere; not when split or reordered.
  CHECK(filter.overlaps(transformer::words("Unable \\Un*a\"ble\\, a. Not able; incapable.")));
  CHECK(filter.overlaps(transformer::words("not able")));
  CHECK_FALSE(filter.overlaps(transformer::words("able, not unable")));
  CHECK_FALSE(filter.overlaps(transformer::words("not very able")));
  CHECK_FALSE(filter.overlaps({}));

  SECTION("short glosses below the minimum are ignored") {
    transformer::overlap_filter strict(3);
    strict.add(transformer::words("not able"));
    strict.add(transformer::words("having no legs"));
    CHECK(strict.size() == 1);
    CHECK_FALSE(strict.overlaps(transformer::words("he was not able to go")));
    CHECK(strict.overlaps(transformer::words("a snake, having no legs")));
  }
}

// Hidden (run with "[.real]"): statistics of the installed WordNet and GCIDE.
TEST_CASE("real WordNet and GCIDE statistics", "[.real]") {
  const fs::path wordnet_dir = "/usr/share/wordnet";
  if (!fs::exists(wordnet_dir / "data.noun")) {
    WARN("WordNet is not installed (Debian package wordnet-base); skipped");
    return;
  }
  using clock = std::chrono::steady_clock;
  const auto seconds_since = [](clock::time_point start) {
    return std::chrono::duration<double>(clock::now() - start).count();
  };

  auto start = clock::now();
  const std::vector<transformer::synset> synsets = transformer::read_wordnet(wordnet_dir);
  std::cout << "WordNet: " << synsets.size() << " synsets read in " << seconds_since(start) << " s\n";
  REQUIRE(synsets.size() == 117659);

  std::array<std::int64_t, 45> per_lexfile{};
  std::array<std::int64_t, 3> per_split{};
  for (const auto& s : synsets) {
    ++per_lexfile[static_cast<std::size_t>(s.lexfile)];
    ++per_split[static_cast<std::size_t>(transformer::split_of(s))];
    // The names table agrees with the files: noun files hold noun.* lexfiles, and so on.
    const std::string_view name = transformer::lexfile_names[static_cast<std::size_t>(s.lexfile)];
    const std::string_view prefix = s.file_pos == 'n'   ? "noun."
                                    : s.file_pos == 'v' ? "verb."
                                    : s.file_pos == 'a' ? "adj."
                                                        : "adv.";
    if (!name.starts_with(prefix))
      FAIL("synset " << s.offset << " in data file " << s.file_pos << " has lexfile " << name);
  }
  const auto distinct = std::count_if(per_lexfile.begin(), per_lexfile.end(), [](std::int64_t c) { return c > 0; });
  const auto majority =
      static_cast<std::size_t>(std::max_element(per_lexfile.begin(), per_lexfile.end()) - per_lexfile.begin());
  const double total = static_cast<double>(synsets.size());
  const double majority_share = static_cast<double>(per_lexfile[majority]) / total;
  std::cout << "lexfiles: " << distinct << "; majority " << transformer::lexfile_names[majority] << " "
            << per_lexfile[majority] << " (" << 100 * majority_share << "%)\n"
            << "splits: train " << per_split[0] << ", validation " << per_split[1] << ", test " << per_split[2] << "\n";
  CHECK(distinct == 45);
  CHECK(std::abs(majority_share - 0.123) <= 0.002);
  CHECK(std::abs(per_split[0] / total - 0.8) <= 0.01);
  CHECK(std::abs(per_split[1] / total - 0.1) <= 0.01);
  CHECK(std::abs(per_split[2] / total - 0.1) <= 0.01);

  const fs::path gcide = "/usr/share/dictd/gcide.dict.dz";
  if (!fs::exists(gcide)) {
    WARN("GCIDE is not installed (Debian package dict-gcide); skipped");
    return;
  }
  start = clock::now();
  const std::string text = transformer::read_gzip(gcide);
  std::cout << "GCIDE: " << text.size() << " bytes decompressed in " << seconds_since(start) << " s\n";
  CHECK(text.size() == 39952321);

  start = clock::now();
  const std::vector<std::string> paragraphs = transformer::gcide_paragraphs(text);
  std::size_t kept_bytes = 0;
  for (const auto& p : paragraphs) kept_bytes += p.size();
  std::cout << "paragraphs: " << paragraphs.size() << " (" << kept_bytes << " bytes joined) in "
            << seconds_since(start) << " s\n";

  start = clock::now();
  transformer::word_counter counter;
  for (const auto& p : paragraphs) counter.add_text(p);
  std::cout << "words: " << counter.total() << ", distinct " << counter.distinct() << ", tokenized and counted in "
            << seconds_since(start) << " s\n";
  const auto vocab = transformer::vocabulary::from_counts(counter, 8000);
  std::cout << "vocabulary of 8000: top words " << vocab.word(4) << " " << vocab.word(5) << " " << vocab.word(6)
            << "; checksum " << vocab.checksum() << "\n";

  // How much of the pre-training text touches validation/test glosses.
  start = clock::now();
  std::array<std::int64_t, 8> short_glosses{};
  transformer::overlap_filter filter;
  transformer::overlap_filter filter_min3(3);
  for (const auto& s : synsets) {
    if (transformer::split_of(s) == split::train) continue;
    const auto gloss_words = transformer::words(s.gloss);
    if (gloss_words.size() < 8) ++short_glosses[gloss_words.size()];
    filter.add(gloss_words);
    filter_min3.add(gloss_words);
  }
  std::int64_t flagged = 0;
  std::int64_t flagged_min3 = 0;
  for (const auto& p : paragraphs) {
    const auto paragraph_words = transformer::words(p);
    flagged += filter.overlaps(paragraph_words) ? 1 : 0;
    flagged_min3 += filter_min3.overlaps(paragraph_words) ? 1 : 0;
  }
  std::cout << "overlap: " << filter.size() << " runs stored; short validation/test glosses by length 0..7:";
  for (const auto c : short_glosses) std::cout << " " << c;
  std::cout << "\n  paragraphs flagged: " << flagged << " (all lengths), " << flagged_min3
            << " (glosses of 3+ words); both filters in " << seconds_since(start) << " s\n";
}

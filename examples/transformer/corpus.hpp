// Data for the transformer example: WordNet synsets (the fine-tuning task: which of the 45
// lexicographer files a gloss comes from), GCIDE dictionary text (pre-training), a deliberately
// simple word tokenizer, a vocabulary, and a filter that keeps validation/test glosses out of the
// pre-training text (GCIDE is partly derived from WordNet, so some of its text equals WordNet's).
//
// Header-only; needs the standard library and zlib. Every reader throws on malformed input, with
// the file name and line number, rather than guessing.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace transformer {

// ------------------------------------------------------------------------------------------------
// Hashing

inline constexpr std::uint64_t fnv1a_offset_basis = 14695981039346656037ULL;
inline constexpr std::uint64_t fnv1a_prime = 1099511628211ULL;

/// 64-bit FNV-1a over `bytes`, continuing from `hash` (so that pieces can be chained).
inline std::uint64_t fnv1a64(std::string_view bytes, std::uint64_t hash = fnv1a_offset_basis) noexcept {
  for (const char c : bytes) {
    hash ^= static_cast<unsigned char>(c);
    hash *= fnv1a_prime;
  }
  return hash;
}

// ------------------------------------------------------------------------------------------------
// WordNet

/// WordNet's lexicographer files, lexnames(5WN), indexed by lex_filenum. Data, not derived.
inline constexpr std::array<std::string_view, 45> lexfile_names = {
    /*  0 */ "adj.all",            "adj.pert",           "adv.all",            "noun.Tops",          "noun.act",
    /*  5 */ "noun.animal",        "noun.artifact",      "noun.attribute",     "noun.body",          "noun.cognition",
    /* 10 */ "noun.communication", "noun.event",         "noun.feeling",       "noun.food",          "noun.group",
    /* 15 */ "noun.location",      "noun.motive",        "noun.object",        "noun.person",        "noun.phenomenon",
    /* 20 */ "noun.plant",         "noun.possession",    "noun.process",       "noun.quantity",      "noun.relation",
    /* 25 */ "noun.shape",         "noun.state",         "noun.substance",     "noun.time",          "verb.body",
    /* 30 */ "verb.change",        "verb.cognition",     "verb.communication", "verb.competition",   "verb.consumption",
    /* 35 */ "verb.contact",       "verb.creation",      "verb.emotion",       "verb.motion",        "verb.perception",
    /* 40 */ "verb.possession",    "verb.social",        "verb.stative",       "verb.weather",       "adj.ppl",
};

struct synset {
  char pos = 'n';          ///< ss_type: 'n', 'v', 'a', 's' (adjective satellite) or 'r'
  char file_pos = 'n';     ///< the data file's part of speech: 'n', 'v', 'a' or 'r' ('s' lives in 'a')
  std::int64_t offset = 0; ///< byte offset in its data file: with file_pos, the synset's identity
  int lexfile = 0;         ///< lex_filenum, 0..44: an index into lexfile_names
  std::string gloss;       ///< the text after the first " | ", trimmed
};

namespace detail {

inline bool is_ascii_digit(char c) noexcept { return c >= '0' && c <= '9'; }
inline bool is_ascii_space(char c) noexcept {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

inline std::string_view trim(std::string_view s) noexcept {
  while (!s.empty() && is_ascii_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_ascii_space(s.back())) s.remove_suffix(1);
  return s;
}

/// Splits off the next space-separated field of `rest` (leading spaces skipped); empty at the end.
inline std::string_view next_field(std::string_view& rest) noexcept {
  while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
  const std::size_t end = std::min(rest.find(' '), rest.size());
  const std::string_view field = rest.substr(0, end);
  rest.remove_prefix(end);
  return field;
}

[[noreturn]] inline void malformed(const std::filesystem::path& file, std::size_t line, const std::string& what) {
  throw std::runtime_error(file.string() + ":" + std::to_string(line) + ": " + what);
}

inline std::string read_whole_file(const std::filesystem::path& file, std::string_view package_hint) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    std::string message = "cannot open " + file.string();
    if (!package_hint.empty()) message += " (provided by the Debian package " + std::string(package_hint) + ")";
    throw std::runtime_error(message);
  }
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error("error while reading " + file.string());
  return content;
}

/// One synset line of a data file; `file_pos` is the file's part of speech.
inline synset parse_synset_line(std::string_view line, char file_pos, const std::filesystem::path& file,
                                std::size_t line_number) {
  std::string_view rest = line;
  const std::string_view offset = next_field(rest);
  const std::string_view lexfile = next_field(rest);
  const std::string_view ss_type = next_field(rest);
  const std::string_view word_count = next_field(rest);

  // Offsets are 8 digits in WordNet 3.0; 18 keeps any digit string inside int64.
  if (offset.empty() || offset.size() > 18 || !std::all_of(offset.begin(), offset.end(), is_ascii_digit))
    malformed(file, line_number, "synset offset is not a decimal number: '" + std::string(offset) + "'");
  if (lexfile.size() != 2 || !is_ascii_digit(lexfile[0]) || !is_ascii_digit(lexfile[1]))
    malformed(file, line_number, "lex_filenum is not two decimal digits: '" + std::string(lexfile) + "'");
  const int lexfile_number = (lexfile[0] - '0') * 10 + (lexfile[1] - '0');
  if (lexfile_number >= static_cast<int>(lexfile_names.size()))
    malformed(file, line_number, "lex_filenum " + std::to_string(lexfile_number) + " is outside 0..44");

  // The ss_type must belong to the file, or the synset's identity (file, offset) would be wrong.
  const bool type_fits = ss_type.size() == 1 &&
                         (ss_type[0] == file_pos || (file_pos == 'a' && ss_type[0] == 's'));
  if (!type_fits)
    malformed(file, line_number, "ss_type '" + std::string(ss_type) + "' does not belong in this file");
  const auto is_hex = [](char c) { return is_ascii_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); };
  if (word_count.empty() || !std::all_of(word_count.begin(), word_count.end(), is_hex))
    malformed(file, line_number, "w_cnt is not a hexadecimal number: '" + std::string(word_count) + "'");

  // The first " | " ends the pointers and frames; a later '|' belongs to the gloss.
  const std::size_t bar = line.find(" | ");
  if (bar == std::string_view::npos) malformed(file, line_number, "no ' | ' before the gloss");

  synset s;
  s.pos = ss_type[0];
  s.file_pos = file_pos;
  s.offset = 0;
  for (const char c : offset) s.offset = s.offset * 10 + (c - '0');
  s.lexfile = lexfile_number;
  s.gloss = std::string(trim(line.substr(bar + 3)));
  return s;
}

}  // namespace detail

/// Reads WordNet 3.0's data.noun, data.verb, data.adj and data.adv from `dir`, in that order and
/// in file order. Lines starting with two spaces (the license header) and empty lines are skipped;
/// anything else must be a synset line. The files are read as bytes (WordNet is ASCII/Latin-1).
inline std::vector<synset> read_wordnet(const std::filesystem::path& dir) {
  struct data_file {
    const char* name;
    char pos;
  };
  static constexpr std::array<data_file, 4> files = {
      data_file{"data.noun", 'n'}, data_file{"data.verb", 'v'}, data_file{"data.adj", 'a'},
      data_file{"data.adv", 'r'}};
  std::vector<synset> synsets;
  for (const data_file& f : files) {
    const std::filesystem::path path = dir / f.name;
    const std::string content = detail::read_whole_file(path, "wordnet-base");
    std::string_view rest = content;
    std::size_t line_number = 0;
    while (!rest.empty()) {
      const std::size_t end = std::min(rest.find('\n'), rest.size());
      std::string_view line = rest.substr(0, end);
      rest.remove_prefix(std::min(end + 1, rest.size()));
      ++line_number;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.empty() || line.starts_with("  ")) continue;
      synsets.push_back(detail::parse_synset_line(line, f.pos, path, line_number));
    }
  }
  return synsets;
}

// ------------------------------------------------------------------------------------------------
// Split

enum class split { train, validation, test };

/// The split of a synset identity. THE RULE MUST NEVER CHANGE (results and caches depend on it):
///   key  = file part of speech ('n', 'v', 'a' or 'r'; satellites 's' are in data.adj, so 'a'),
///          ':', and the offset in decimal, zero-padded to at least 8 digits: e.g. "n:00001740";
///   h    = 64-bit FNV-1a of key's bytes (offset basis 14695981039346656037, prime 1099511628211);
///   h % 10: 0..7 train, 8 validation, 9 test.
/// It depends only on the synset's identity, not on the order or on other synsets.
inline split split_of(char file_pos, std::int64_t offset) {
  if (file_pos != 'n' && file_pos != 'v' && file_pos != 'a' && file_pos != 'r')
    throw std::invalid_argument(std::string("split_of: file part of speech must be n, v, a or r, not '") +
                                file_pos + "'");
  if (offset < 0) throw std::invalid_argument("split_of: negative offset " + std::to_string(offset));
  std::string digits = std::to_string(offset);
  if (digits.size() < 8) digits.insert(0, 8 - digits.size(), '0');
  const std::string key = std::string(1, file_pos) + ":" + digits;
  const std::uint64_t bucket = fnv1a64(key) % 10;
  if (bucket < 8) return split::train;
  return bucket == 8 ? split::validation : split::test;
}

inline split split_of(const synset& s) { return split_of(s.file_pos, s.offset); }

// ------------------------------------------------------------------------------------------------
// GCIDE

inline constexpr std::size_t default_max_gzip_bytes = std::size_t{256} << 20;

/// The whole decompressed content of a gzip file (dictzip files are gzip files; a file that is
/// not compressed is read as is, which is zlib's behaviour). Throws if the file is missing,
/// corrupt or truncated, or if it decompresses to more than `max_bytes`.
inline std::string read_gzip(const std::filesystem::path& file, std::size_t max_bytes = default_max_gzip_bytes) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(file, ec))
    throw std::runtime_error("read_gzip: no such file: " + file.string());
  gzFile gz = gzopen(file.string().c_str(), "rb");
  if (gz == nullptr)
    throw std::runtime_error("read_gzip: cannot open " + file.string() + ": " + std::strerror(errno));
  // Closes the handle on every path out, the throwing ones included.
  struct closer {
    gzFile handle;
    ~closer() { gzclose(handle); }
  } guard{gz};
  gzbuffer(gz, 1U << 17);

  constexpr std::size_t chunk = std::size_t{1} << 20;
  std::string content;
  for (;;) {
    // Read at most one byte past the limit: enough to know it is exceeded.
    const std::size_t room = max_bytes - std::min(max_bytes, content.size());
    const std::size_t want = std::min(chunk, room == std::numeric_limits<std::size_t>::max() ? room : room + 1);
    const std::size_t old_size = content.size();
    content.resize(old_size + want);
    const int got = gzread(gz, content.data() + old_size, static_cast<unsigned>(want));
    if (got < 0) {
      int code = 0;
      const char* message = gzerror(gz, &code);
      throw std::runtime_error("read_gzip: " + file.string() + ": " + (message != nullptr ? message : "read error"));
    }
    content.resize(old_size + static_cast<std::size_t>(got));
    if (content.size() > max_bytes)
      throw std::runtime_error("read_gzip: " + file.string() + " decompresses to more than " +
                               std::to_string(max_bytes) + " bytes (the limit)");
    if (got == 0) break;
  }
  // A truncated stream ends with gzread returning 0 and the error recorded.
  int code = Z_OK;
  const char* message = gzerror(gz, &code);
  if (code != Z_OK && code != Z_STREAM_END)
    throw std::runtime_error("read_gzip: " + file.string() + ": " + (message != nullptr ? message : "read error"));
  return content;
}

namespace detail {

/// A GCIDE entry's first line: the headword at column 0, then " \", the marked-up headword, "\",
/// e.g. `Zythum \Zy"thum\ (z[i^]"th[u^]m), n.` or `0 \0\ adj.`.
inline bool is_entry_headline(std::string_view line) noexcept {
  if (line.empty() || is_ascii_space(line.front()) || line.front() == '\\') return false;
  const std::size_t open = line.find(" \\");
  return open != std::string_view::npos && line.find('\\', open + 2) != std::string_view::npos;
}

/// A line that only holds one bracketed tag: a source such as "[1913 Webster]", "[WordNet 1.5]",
/// "[PJC]", or a usage label such as "[Obs.]" on its own line.
inline bool is_tag_only_line(std::string_view line) noexcept {
  const std::string_view t = trim(line);
  if (t.size() < 2 || t.front() != '[' || t.back() != ']') return false;
  const std::string_view inside = t.substr(1, t.size() - 2);
  return inside.find_first_of("[]") == std::string_view::npos;
}

}  // namespace detail

/// GCIDE's dictd text as paragraphs, each joined into one line (lines trimmed, joined by one
/// space). Rules:
///   * the header is dropped: everything before the first entry headline (see is_entry_headline;
///     "00-database-*" / "00-gcide-*" lines never count). In the real file that is the dictd
///     header entries, the license and the preamble, which ends in a quotation glued to the first
///     entry without a blank line (about 3.7 kB);
///   * paragraphs are blocks of lines separated by blank (whitespace-only) lines;
///   * lines that only hold a bracketed tag ("[1913 Webster]", "[PJC]", "[Obs.]") are dropped;
///   * markup (\ * { } " [e^] ...) is left for the tokenizer.
/// Throws std::invalid_argument if there is no entry headline at all (not GCIDE text).
inline std::vector<std::string> gcide_paragraphs(std::string_view text) {
  std::vector<std::string> paragraphs;
  std::string current;
  bool in_body = false;
  while (!text.empty()) {
    const std::size_t end = std::min(text.find('\n'), text.size());
    const std::string_view line = text.substr(0, end);
    text.remove_prefix(std::min(end + 1, text.size()));
    if (!in_body) {
      if (line.starts_with("00-database") || line.starts_with("00-gcide") || !detail::is_entry_headline(line))
        continue;
      in_body = true;
    }
    const std::string_view content = detail::trim(line);
    if (content.empty()) {
      if (!current.empty()) paragraphs.push_back(std::move(current));
      current.clear();
      continue;
    }
    if (detail::is_tag_only_line(content)) continue;
    if (!current.empty()) current += ' ';
    current += content;
  }
  if (!current.empty()) paragraphs.push_back(std::move(current));
  if (!in_body) throw std::invalid_argument("gcide_paragraphs: no entry line of the form 'word \\word\\' found");
  return paragraphs;
}

// ------------------------------------------------------------------------------------------------
// Tokenizer

/// Calls `on_word(std::string_view)` for each word of `text`. A word is a maximal run of ASCII
/// letters (lowercased) or a maximal run of ASCII digits; everything else (punctuation, GCIDE
/// markup such as \ * { } " [ ], non-ASCII bytes) only separates words. So "1st" is "1" "st" and
/// "Af*fat\"u*ate" is "af" "fat" "u" "ate". Deliberately simple: no stemming, no Unicode.
/// The view passed on is valid only during the call (it points into a reused buffer).
template <typename OnWord>
void for_each_word(std::string_view text, OnWord&& on_word) {
  enum class kind { other, letter, digit };
  const auto kind_of = [](char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return kind::letter;
    if (c >= '0' && c <= '9') return kind::digit;
    return kind::other;
  };
  std::string buffer;
  std::size_t i = 0;
  while (i < text.size()) {
    const kind k = kind_of(text[i]);
    if (k == kind::other) {
      ++i;
      continue;
    }
    buffer.clear();
    while (i < text.size() && kind_of(text[i]) == k) {
      const char c = text[i++];
      buffer += (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
    }
    on_word(std::string_view(buffer));
  }
}

/// The words of `text` (see for_each_word), as strings.
inline std::vector<std::string> words(std::string_view text) {
  std::vector<std::string> result;
  for_each_word(text, [&](std::string_view w) { result.emplace_back(w); });
  return result;
}

// ------------------------------------------------------------------------------------------------
// Vocabulary

/// Hash for string-keyed unordered containers that can be searched with a string_view without
/// building a std::string.
struct string_hash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

/// Counts words; feed it words or whole texts.
class word_counter {
 public:
  using map_type = std::unordered_map<std::string, std::int64_t, string_hash, std::equal_to<>>;

  void add(std::string_view word, std::int64_t count = 1) {
    if (const auto it = counts_.find(word); it != counts_.end()) {
      it->second += count;
    } else {
      counts_.emplace(std::string(word), count);
    }
    total_ += count;
  }
  void add_text(std::string_view text) {
    for_each_word(text, [this](std::string_view w) { add(w); });
  }
  std::int64_t count(std::string_view word) const {
    const auto it = counts_.find(word);
    return it == counts_.end() ? 0 : it->second;
  }
  std::size_t distinct() const noexcept { return counts_.size(); }
  std::int64_t total() const noexcept { return total_; }
  const map_type& counts() const noexcept { return counts_; }

 private:
  map_type counts_;
  std::int64_t total_ = 0;
};

/// Word ↔ id. Ids 0..3 are the specials; then words by descending count, ties broken by the
/// words' byte order, so that the same counts always give the same vocabulary.
class vocabulary {
 public:
  static constexpr std::int32_t pad = 0;
  static constexpr std::int32_t unk = 1;
  static constexpr std::int32_t mask = 2;
  static constexpr std::int32_t cls = 3;
  static constexpr std::int32_t special_count = 4;
  /// The specials' spellings: they cannot be produced by for_each_word (brackets, capitals),
  /// so they never collide with a word; id() does not map them back.
  static constexpr std::array<std::string_view, 4> special_words = {"[PAD]", "[UNK]", "[MASK]", "[CLS]"};

  /// The `max_size - 4` most frequent words with at least `min_count` occurrences (max_size counts
  /// the specials).
  static vocabulary from_counts(const word_counter& counter, std::size_t max_size, std::int64_t min_count = 1) {
    if (max_size < special_count)
      throw std::invalid_argument("vocabulary: max_size " + std::to_string(max_size) + " is below the 4 specials");
    using entry = const word_counter::map_type::value_type*;
    std::vector<entry> entries;
    entries.reserve(counter.distinct());
    for (const auto& kv : counter.counts())
      if (kv.second >= min_count) entries.push_back(&kv);
    const auto before = [](entry a, entry b) {
      return a->second != b->second ? a->second > b->second : a->first < b->first;
    };
    const std::size_t keep = std::min(entries.size(), max_size - special_count);
    std::partial_sort(entries.begin(), entries.begin() + static_cast<std::ptrdiff_t>(keep), entries.end(), before);
    std::vector<std::string> ordered;
    ordered.reserve(keep);
    for (std::size_t i = 0; i < keep; ++i) ordered.push_back(entries[i]->first);
    return from_ordered_words(std::move(ordered));
  }

  /// The words after the specials, in id order (e.g. read back from a cache).
  static vocabulary from_ordered_words(std::vector<std::string> ordered) {
    vocabulary v;
    v.words_.reserve(ordered.size() + special_count);
    for (const std::string_view s : special_words) v.words_.emplace_back(s);
    v.ids_.reserve(ordered.size());
    for (std::string& w : ordered) {
      if (w.empty()) throw std::invalid_argument("vocabulary: empty word");
      if (v.words_.size() >= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()))
        throw std::invalid_argument("vocabulary: too many words for 32-bit ids");
      const auto id = static_cast<std::int32_t>(v.words_.size());
      if (!v.ids_.emplace(w, id).second) throw std::invalid_argument("vocabulary: duplicate word '" + w + "'");
      v.words_.push_back(std::move(w));
    }
    return v;
  }

  /// The word's id, or unk.
  std::int32_t id(std::string_view word) const {
    const auto it = ids_.find(word);
    return it == ids_.end() ? unk : it->second;
  }
  const std::string& word(std::int32_t id) const {
    if (id < 0 || static_cast<std::size_t>(id) >= words_.size())
      throw std::out_of_range("vocabulary: id " + std::to_string(id) + " outside 0.." +
                              std::to_string(words_.size() - 1));
    return words_[static_cast<std::size_t>(id)];
  }
  std::size_t size() const noexcept { return words_.size(); }

  /// The ids of the words of `text`, appended to `out`.
  void encode(std::string_view text, std::vector<std::int32_t>& out) const {
    for_each_word(text, [&](std::string_view w) { out.push_back(id(w)); });
  }
  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<std::int32_t> out;
    encode(text, out);
    return out;
  }

  /// CRC-32 of every entry (specials included) in id order, each followed by '\n': a cache key.
  std::uint32_t checksum() const {
    uLong crc = crc32(0L, Z_NULL, 0);
    const auto feed = [&crc](std::string_view bytes) {
      while (!bytes.empty()) {
        const std::size_t n = std::min<std::size_t>(bytes.size(), std::numeric_limits<uInt>::max());
        crc = crc32(crc, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(n));
        bytes.remove_prefix(n);
      }
    };
    for (const std::string& w : words_) {
      feed(w);
      feed("\n");
    }
    return static_cast<std::uint32_t>(crc);
  }

 private:
  vocabulary() = default;
  std::vector<std::string> words_;
  std::unordered_map<std::string, std::int32_t, string_hash, std::equal_to<>> ids_;
};

// ------------------------------------------------------------------------------------------------
// Overlap filter

/// Flags pre-training paragraphs that contain text of a protected (validation or test) gloss.
/// Rule, on word strings (so it does not depend on a vocabulary):
///   * a gloss of `window` (8) words or more is represented by every run of 8 consecutive words;
///   * a shorter gloss (at least `min_short_words` words) by the whole gloss;
///   * a paragraph overlaps if any run of its consecutive words equals a stored run (any run of
///     8 words, and any run of one of the short lengths that occur).
/// A long gloss that shares only 7 consecutive words with a paragraph is not flagged.
/// Runs are stored as 64-bit hashes: each word is hashed with FNV-1a (then mixed), and a run is
/// the fold h = (h ^ word_hash) * prime over its words, finished with its length. A hash
/// collision can flag a paragraph wrongly (about 1e-7 over all of GCIDE); it never misses one.
class overlap_filter {
 public:
  static constexpr int window = 8;

  /// Short glosses below `min_short_words` words are ignored: a one-word gloss would otherwise
  /// flag every paragraph that uses that word.
  explicit overlap_filter(std::size_t min_short_words = 1)
      : min_short_words_(std::max<std::size_t>(1, min_short_words)) {}

  void add(std::span<const std::string> gloss_words) {
    const std::size_t n = gloss_words.size();
    if (n < min_short_words_) return;
    const std::vector<std::uint64_t> hashes = word_hashes(gloss_words);
    if (n < static_cast<std::size_t>(window)) {
      runs_.insert(run_hash(hashes.data(), n));
      length_present_[n] = true;
      return;
    }
    for (std::size_t start = 0; start + window <= n; ++start) runs_.insert(run_hash(hashes.data() + start, window));
    length_present_[window] = true;
  }

  bool overlaps(std::span<const std::string> paragraph_words) const {
    if (runs_.empty()) return false;
    const std::vector<std::uint64_t> hashes = word_hashes(paragraph_words);
    const std::size_t n = hashes.size();
    // From each start, grow the run one word at a time and look it up at the lengths stored.
    for (std::size_t start = 0; start < n; ++start) {
      std::uint64_t h = fnv1a_offset_basis;
      const std::size_t longest = std::min<std::size_t>(window, n - start);
      for (std::size_t length = 1; length <= longest; ++length) {
        h = (h ^ hashes[start + length - 1]) * fnv1a_prime;
        if (length_present_[length] && runs_.contains(finish(h, length))) return true;
      }
    }
    return false;
  }

  /// How many distinct runs are stored.
  std::size_t size() const noexcept { return runs_.size(); }

 private:
  static std::uint64_t mix(std::uint64_t x) noexcept {  // splitmix64's finalizer
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
  }
  static std::vector<std::uint64_t> word_hashes(std::span<const std::string> ws) {
    std::vector<std::uint64_t> hashes;
    hashes.reserve(ws.size());
    for (const std::string& w : ws) hashes.push_back(mix(fnv1a64(w)));
    return hashes;
  }
  static std::uint64_t finish(std::uint64_t h, std::size_t length) noexcept {
    return mix((h ^ static_cast<std::uint64_t>(length)) * fnv1a_prime);
  }
  static std::uint64_t run_hash(const std::uint64_t* hashes, std::size_t length) noexcept {
    std::uint64_t h = fnv1a_offset_basis;
    for (std::size_t i = 0; i < length; ++i) h = (h ^ hashes[i]) * fnv1a_prime;
    return finish(h, length);
  }

  std::size_t min_short_words_;
  std::unordered_set<std::uint64_t> runs_;
  std::array<bool, window + 1> length_present_{};
};

}  // namespace transformer

#pragma once
// The demo's two pictures, drawn as plain SVG text (no plotting library):
//  * rank_heatmap: the final rank of every adapted matrix, one row per budget, like the
//    rank-distribution figure of the AdaLoRA paper (Zhang et al. 2023, Fig. 1/4);
//  * line_chart: validation losses (log scale), one panel per budget, one line per method.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace finetune::svg {

/// Text with the five XML special characters escaped.
inline std::string escape(const std::string& s) {
  std::string out;
  for (const char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out += c;
    }
  }
  return out;
}

/// printf into a std::string (numbers with a fixed format, so the files are byte-stable).
template <class... Args>
std::string format(const char* fmt, Args... args) {
  const int n = std::snprintf(nullptr, 0, fmt, args...);
  std::string s(static_cast<std::size_t>(n), '\0');
  std::snprintf(s.data(), s.size() + 1, fmt, args...);
  return s;
}

/// A minimal SVG document: the elements the two charts need.
class document {
 public:
  document(double width, double height) : width_(width), height_(height) {}

  void rect(double x, double y, double w, double h, const std::string& fill,
            const std::string& stroke = "none") {
    body_ += format(R"(<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" stroke="%s"/>)",
                    x, y, w, h, fill.c_str(), stroke.c_str()) +
             "\n";
  }
  void line(double x1, double y1, double x2, double y2, const std::string& stroke, double width = 1,
            const std::string& dash = "") {
    body_ +=
        format(R"(<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="%.1f")",
               x1, y1, x2, y2, stroke.c_str(), width);
    if (!dash.empty()) body_ += " stroke-dasharray=\"" + dash + "\"";
    body_ += "/>\n";
  }
  void polyline(const std::vector<std::pair<double, double>>& points, const std::string& stroke,
                double width = 2, const std::string& dash = "") {
    body_ += "<polyline fill=\"none\" stroke=\"" + stroke + "\" stroke-width=\"" +
             format("%.1f", width) + "\"";
    if (!dash.empty()) body_ += " stroke-dasharray=\"" + dash + "\"";
    body_ += " points=\"";
    for (const auto& [x, y] : points) body_ += format("%.1f,%.1f ", x, y);
    body_ += "\"/>\n";
  }
  /// anchor: "start", "middle" or "end".
  void text(double x, double y, const std::string& s, double size = 12,
            const std::string& anchor = "start", const std::string& fill = "#222",
            bool bold = false) {
    body_ += format(R"(<text x="%.1f" y="%.1f" font-size="%.1f" text-anchor="%s" fill="%s")", x, y,
                    size, anchor.c_str(), fill.c_str());
    if (bold) body_ += " font-weight=\"bold\"";
    body_ += ">" + escape(s) + "</text>\n";
  }

  std::string str() const {
    return format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" )"
                  R"(viewBox="0 0 %.0f %.0f" font-family="Helvetica, Arial, sans-serif">)",
                  width_, height_, width_, height_) +
           "\n" + format(R"(<rect width="%.0f" height="%.0f" fill="white"/>)", width_, height_) +
           "\n" + body_ + "</svg>\n";
  }

 private:
  double width_, height_;
  std::string body_;
};

/// White → dark green, by a value in [0, 1].
inline std::string heat_color(double v) {
  v = std::clamp(v, 0.0, 1.0);
  const auto mix = [v](int from, int to) { return static_cast<int>(from + (to - from) * v); };
  return format("#%02x%02x%02x", mix(247, 0), mix(252, 109), mix(245, 44));
}

/// One row of the heatmap: a label and a value per column (NaN leaves the cell blank).
struct heat_row {
  std::string label;
  std::vector<double> values;
};

/// Final ranks per matrix: columns are the adapted matrices, rows the budgets (and the planted
/// ranks, if any). Cell colour is rank / max_rank, and the rank is written in the cell.
inline std::string rank_heatmap(const std::string& title, const std::string& subtitle,
                                const std::vector<std::string>& columns,
                                const std::vector<heat_row>& rows, double max_rank) {
  // No text measurement in SVG: widths from character counts (about 7 px per 12 px character).
  std::size_t label_chars = 4;
  for (const heat_row& r : rows) label_chars = std::max(label_chars, r.label.size());
  const double left = 20 + 7.0 * static_cast<double>(label_chars), top = 70, cell_w = 74,
               cell_h = 34;
  const double width = std::max({left + cell_w * static_cast<double>(columns.size()) + 30,
                                 left + 300, 30 + 10.0 * static_cast<double>(title.size()),
                                 30 + 7.0 * static_cast<double>(subtitle.size())});
  const double height = top + cell_h * static_cast<double>(rows.size()) + 60;
  document d(width, height);
  d.text(12, 24, title, 16, "start", "#222", true);
  d.text(12, 44, subtitle, 12, "start", "#555");
  for (std::size_t c = 0; c < columns.size(); ++c)
    d.text(left + cell_w * (static_cast<double>(c) + 0.5), top - 8, columns[c], 11, "middle");
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const double y = top + cell_h * static_cast<double>(r);
    d.text(left - 10, y + cell_h / 2 + 4, rows[r].label, 12, "end");
    for (std::size_t c = 0; c < rows[r].values.size(); ++c) {
      const double v = rows[r].values[c];
      const double x = left + cell_w * static_cast<double>(c);
      if (std::isnan(v)) continue;
      const double frac = max_rank > 0 ? v / max_rank : 0;
      d.rect(x + 1, y + 1, cell_w - 2, cell_h - 2, heat_color(frac), "#ccc");
      const bool whole = std::abs(v - std::round(v)) < 1e-9;
      d.text(x + cell_w / 2, y + cell_h / 2 + 5, whole ? format("%.0f", v) : format("%.1f", v), 13,
             "middle", frac > 0.55 ? "white" : "#222");
    }
  }
  // Colour scale.
  const double sy = top + cell_h * static_cast<double>(rows.size()) + 22;
  d.text(left - 10, sy + 11, "rank", 11, "end", "#555");
  for (int i = 0; i <= 8; ++i) {
    const double x = left + 30.0 * i;
    d.rect(x, sy, 30, 14, heat_color(i / 8.0), "#ccc");
    if (i % 2 == 0)
      d.text(x + 15, sy + 28, format("%.0f", max_rank * i / 8.0), 10, "middle", "#555");
  }
  return d.str();
}

/// One line of a panel.
struct series {
  std::string label;
  std::string color;
  std::string dash;  ///< "" for solid
  std::vector<std::pair<double, double>> points;
};

struct panel {
  std::string title;
  std::vector<series> lines;
  std::vector<double> markers;  ///< x positions of dotted vertical lines (schedule phases)
};

/// Panels side by side, sharing a logarithmic y axis (losses span decades).
inline std::string line_chart(const std::string& title, const std::string& x_label,
                              const std::string& y_label, const std::vector<panel>& panels) {
  const double pw = 300, ph = 220, left = 70, top = 60, gap = 60;
  const double width = left + (pw + gap) * static_cast<double>(panels.size()) + 10;
  const double height = top + ph + 90;
  double x_max = 1, y_min = INFINITY, y_max = -INFINITY;
  for (const panel& p : panels)
    for (const series& s : p.lines)
      for (const auto& [x, y] : s.points) {
        x_max = std::max(x_max, x);
        if (!(y > 0)) continue;
        y_min = std::min(y_min, y);
        y_max = std::max(y_max, y);
      }
  if (!(y_min <= y_max)) y_min = y_max = 1;
  // Whole decades below, a little headroom above, so that a curve starting at 1 is not
  // squeezed under an empty decade.
  const double lo = std::floor(std::log10(y_min));
  const double hi = std::max(std::log10(y_max) + 0.05 * (std::log10(y_max) - lo), lo + 1);

  document d(width, height);
  d.text(12, 24, title, 16, "start", "#222", true);
  d.text(14, top + ph / 2, y_label, 12, "start", "#555");
  for (std::size_t k = 0; k < panels.size(); ++k) {
    const panel& p = panels[k];
    const double x0 = left + (pw + gap) * static_cast<double>(k) + 40, y0 = top;
    const auto px = [&](double x) { return x0 + pw * x / x_max; };
    const auto py = [&](double y) { return y0 + ph * (1 - (std::log10(y) - lo) / (hi - lo)); };
    d.rect(x0, y0, pw, ph, "#fafafa", "#999");
    d.text(x0 + pw / 2, y0 - 8, p.title, 13, "middle", "#222", true);
    for (double v = lo; v <= hi; v += 1) {  // a grid line per decade
      const double y = py(std::pow(10.0, v));
      d.line(x0, y, x0 + pw, y, "#e4e4e4");
      d.text(x0 - 5, y + 4, format("%g", std::pow(10.0, v)), 10, "end", "#555");
    }
    for (int i = 0; i <= 4; ++i) {
      const double x = x0 + pw * i / 4;
      d.text(x, y0 + ph + 15, format("%.0f", x_max * i / 4), 10, "middle", "#555");
    }
    for (const double m : p.markers) d.line(px(m), y0, px(m), y0 + ph, "#bbb", 1, "2,3");
    for (const series& s : p.lines) {
      std::vector<std::pair<double, double>> pts;
      for (const auto& [x, y] : s.points)
        if (y > 0) pts.emplace_back(px(x), py(y));
      d.polyline(pts, s.color, 2, s.dash);
    }
    d.text(x0 + pw / 2, y0 + ph + 32, x_label, 11, "middle", "#555");
  }
  // Legend from the first panel's lines.
  if (!panels.empty()) {
    double x = left + 40;
    const double y = top + ph + 60;
    for (const series& s : panels.front().lines) {
      d.line(x, y - 4, x + 26, y - 4, s.color, 3, s.dash);
      d.text(x + 32, y, s.label, 12);
      x += 40 + 8.0 * static_cast<double>(s.label.size());
    }
  }
  return d.str();
}

}  // namespace finetune::svg

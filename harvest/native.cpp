// Per-batch updates of dense units on CPU: top/bottom-k (topk.py), seeded samples (reservoir.py) and the
// statistics' histogram (statistics.py), each one loop over the layer's units instead of some forty small tensor
// operations. Built and loaded by native.py; the tensor code is the reference, and the tests check that both
// give the same results. Plain C ABI (no torch headers): it builds in about a second.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

const int64_t kNoKey = std::numeric_limits<int64_t>::max();
const int64_t kNoExponent = -(int64_t(1) << 20);

// [batch, tokens, units] activations: float32 (dtype 0), bfloat16 (1) or float16 (2), strides in elements.
struct Acts {
  const char* data;
  int dtype;
  int64_t item, batch, tokens, units, sb, st, su;
};

// One element of 4 or 2 bytes: fixed-size copies compile to a move, where memcpy(item) is a library call.
inline void copy_item(char* to, const char* from, int64_t item) {
  if (item == 4)
    std::memcpy(to, from, 4);
  else
    std::memcpy(to, from, 2);
}

// Element loads by dtype: float, bfloat16 (uint16_t bits) or _Float16.
template <typename T>
float to_float(T v) {
  return float(v);
}
template <>
float to_float<uint16_t>(uint16_t v) {  // bfloat16
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Calls f with p as a pointer to dtype's elements (float, bfloat16's bits as uint16_t, or _Float16): the one place
// where a loop templated on the element type is picked.
template <typename F>
auto by_dtype(const void* p, int dtype, F f) {
  if (dtype == 0) return f(static_cast<const float*>(p));
  if (dtype == 1) return f(static_cast<const uint16_t*>(p));
  return f(static_cast<const _Float16*>(p));
}

template <bool Largest, typename T>
int64_t extreme_in(const T* row, const uint8_t* row_counted, int64_t first, int64_t tokens) {
  int64_t position = -1;
  float best = 0;
  for (int64_t t = first; t < tokens; ++t) {
    if (!row_counted[t]) continue;
    const float v = to_float(row[t]);
    if (position < 0 || (Largest ? v > best : v < best)) {
      best = v;
      position = t;
    }
  }
  return position;
}

// The first counted position of batch row b reaching the max (or min) of a copied row `out`: what the list keeps
// of an entering context (`first` when none is counted).
int64_t extreme_position(const Acts& a, const uint8_t* counted, int64_t first, int64_t b, const char* out,
                         bool largest) {
  const uint8_t* c = counted + b * a.tokens;
  const int64_t position = by_dtype(out, a.dtype, [&](auto row) {
    return largest ? extreme_in<true>(row, c, first, a.tokens) : extreme_in<false>(row, c, first, a.tokens);
  });
  return position < 0 ? first : position;
}

// A row to copy once a thread's units are merged: batch row b of unit u, into entry `index` (a rank, or a sample).
struct Copy {
  int64_t b, u, index;
};

// Where entering contexts' rows come from: the dense [batch, tokens, units] activations; or (pairs set) a sparse
// source's non-zeros grouped by (batch row, unit) pair, as sparse_index lists them, a row zero elsewhere; or
// (pairs set, starts not) whole rows the reduction gathered while each context was in cache (Gather), a row not
// among them (which the merges never take) read from the dense activations.
struct Rows {
  Acts a;
  const int64_t* pairs;      // [n_pairs] ascending: b * units + u
  int64_t n_pairs;
  const int64_t* starts;     // [n_pairs + 1]: each pair's range of positions and bits; null: gathered rows
  const int64_t* positions;  // ascending within a pair
  const char* bits;          // the values, a.item bytes each (gathered: [n_pairs, tokens])
  const int64_t* extremes;   // gathered: [n_pairs, 2], the positions of each row's max and min

  // Row (b, u) of a sparse source or of gathered rows into out, zero past the tokens up to width; returns its
  // extreme_position.
  int64_t copy_pair(const uint8_t* counted, int64_t first, int64_t b, int64_t u, char* out, int64_t width,
                    bool largest, const int64_t*& from) const {
    const int64_t pair = b * a.units + u;
    const int64_t* end = pairs + n_pairs;
    const int64_t* at = from != end && *from <= pair ? from : pairs;
    for (int step = 0; at != end && *at < pair && step < 8; ++step) ++at;
    if (at != end && *at < pair) at = std::lower_bound(at, end, pair);
    from = at;
    const bool found = at != end && *at == pair;
    if (starts == nullptr) {
      if (width > a.tokens) std::memset(out + a.tokens * a.item, 0, (width - a.tokens) * a.item);
      if (found) {
        std::memcpy(out, bits + (at - pairs) * a.tokens * a.item, a.tokens * a.item);
        const int64_t position = extremes[(at - pairs) * 2 + (largest ? 0 : 1)];
        return position < 0 ? first : position;
      }
      for (int64_t t = 0; t < a.tokens; ++t)
        copy_item(out + t * a.item, a.data + (b * a.sb + t * a.st + u * a.su) * a.item, a.item);
    } else {
      std::memset(out, 0, width * a.item);
      if (found)
        for (int64_t j = starts[at - pairs]; j < starts[at - pairs + 1]; ++j)
          copy_item(out + positions[j] * a.item, bits + j * a.item, a.item);
    }
    return extreme_position(a, counted, first, b, out, largest);
  }

  // Every copy (ordered by batch row, see by_row) into out_of(c), its extreme_position into *position_of(c).
  // From dense activations, a context's rows are read token by token for all its entering units at once: each
  // token's row is then walked in address order, where one unit's strided gather after another's waited on a
  // cache miss per token.
  template <typename Out, typename Position>
  void copy_all(const std::vector<Copy>& copies, const uint8_t* counted, int64_t first, int64_t width,
                bool largest, Out out_of, Position position_of) const {
    if (pairs != nullptr) {
      const int64_t* from = pairs;  // copies ascend (by_row): each search goes on from the last one's pair
      for (const Copy& c : copies)
        *position_of(c) = copy_pair(counted, first, c.b, c.u, out_of(c), width, largest, from);
      return;
    }
    std::vector<char*> outs;
    std::vector<int64_t> offsets;
    for (size_t begin = 0, end = 0; begin < copies.size(); begin = end) {
      const int64_t b = copies[begin].b;
      outs.clear();
      offsets.clear();
      for (end = begin; end < copies.size() && copies[end].b == b; ++end) {
        outs.push_back(out_of(copies[end]));
        offsets.push_back(copies[end].u * a.su * a.item);
      }
      const size_t n = outs.size();
      for (int64_t t = 0; t < a.tokens; ++t) {
        const char* row = a.data + (b * a.sb + t * a.st) * a.item;
        for (size_t i = 0; i < n; ++i) copy_item(outs[i] + t * a.item, row + offsets[i], a.item);
      }
      for (size_t i = 0; i < n; ++i) {
        if (width > a.tokens) std::memset(outs[i] + a.tokens * a.item, 0, (width - a.tokens) * a.item);
        *position_of(copies[begin + i]) = extreme_position(a, counted, first, b, outs[i], largest);
      }
    }
  }
};

// Orders copies by batch row (a counting sort, stable): a context's [tokens, units] block is then read once for
// all its entering units while it is in cache, instead of once per unit.
void by_row(std::vector<Copy>& copies, int64_t batch, std::vector<Copy>& scratch, std::vector<int64_t>& start) {
  start.assign(batch + 1, 0);
  for (const Copy& c : copies) ++start[c.b + 1];
  for (int64_t b = 0; b < batch; ++b) start[b + 1] += start[b];
  scratch.resize(copies.size());
  for (const Copy& c : copies) scratch[start[c.b]++] = c;
  copies.swap(scratch);
}

// The calling thread's index and its even part [lo, hi) of `total` items, inside a parallel region.
struct Share {
  int me;
  int64_t lo, hi;
};
Share my_share(int64_t total) {
  int n = 1, me = 0;
#ifdef _OPENMP
  n = omp_get_num_threads();
  me = omp_get_thread_num();
#endif
  return {me, total * me / n, total * (me + 1) / n};
}

// The batch rows that may enter a list or sample of each of units [lo, hi), rows ascending: where the reduction
// gathered rows, those of these units (a superset of every entering one, see Gather), so that each unit's merge
// looks at a few rows, not at its whole batch column, and units with none are skipped; otherwise every row.
struct Candidates {
  bool all = true;
  int64_t lo = 0, batch = 0;
  std::vector<int32_t> start, rows;  // unit u's rows: rows[start[u - lo]] to rows[start[u - lo + 1]]

  Candidates(const Rows& source, int64_t batch_rows, int64_t lo_unit, int64_t hi_unit)
      : all(source.pairs == nullptr || source.starts != nullptr), lo(lo_unit), batch(batch_rows) {
    if (all) return;
    const int64_t units = source.a.units;
    start.assign(hi_unit - lo + 2, 0);
    for (int pass = 0; pass < 2; ++pass) {  // count, then place (pairs ascend by row, then unit)
      if (pass == 1) {
        for (size_t i = 1; i < start.size(); ++i) start[i] += start[i - 1];
        rows.resize(start.back());
      }
      int64_t b = 0;
      for (int64_t i = 0; i < source.n_pairs; ++i) {
        while (source.pairs[i] >= (b + 1) * units) ++b;
        const int64_t u = source.pairs[i] - b * units;
        if (u < lo || u >= hi_unit) continue;
        if (pass == 0)
          ++start[u - lo + 2];
        else
          rows[start[u - lo + 1]++] = int32_t(b);
      }
    }
  }
  // Calls f(b) for each candidate row b of unit u, ascending.
  template <typename F>
  void each(int64_t u, F f) const {
    if (all) {
      for (int64_t b = 0; b < batch; ++b) f(b);
      return;
    }
    for (int32_t i = start[u - lo]; i < start[u - lo + 1]; ++i) f(int64_t(rows[i]));
  }
  bool none(int64_t u) const { return !all && start[u - lo] == start[u - lo + 1]; }
};

// Which of n_bins equal parts of [0, W) a context max x > 0 falls in, for one unit's W = 2^exponent: x scaled by
// 2^min(-exponent, 126) rounded once to float32, then as reservoir._bin (whose two exact float steps round the
// same way: they differ only below 2^-126, in bin 0 either way).
struct Binning {
  double factor;
  int64_t n_bins;
  Binning(int64_t exponent, int64_t bins) : factor(std::ldexp(1.0, int(std::min<int64_t>(-exponent, 126)))),
                                            n_bins(bins) {}
  int64_t of(float x) const {
    if (n_bins == 1) return 0;
    const float y = std::floor(float(double(x) * factor) * float(n_bins));
    return y < 0 ? 0 : y > float(n_bins - 1) ? n_bins - 1 : int64_t(y);
  }
};

// Each bin's largest kept key (the first slot holding it: the entry a smaller key replaces).
void worst_of(const int64_t* keys, int64_t n_bins, int64_t per, int64_t* worst, int64_t* slot) {
  for (int64_t bin = 0; bin < n_bins; ++bin) {
    int64_t at = bin * per;
    for (int64_t j = at + 1; j < (bin + 1) * per; ++j)
      if (keys[j] > keys[at]) at = j;
    worst[bin] = keys[at];
    if (slot != nullptr) slot[bin] = at;
  }
}

// What the reduction needs to gather the rows that may enter a list or sample, judged against each list's state as
// the batch starts: a context beating its unit's k-th score, or firing with a key below the largest kept in its
// bin (bins only merge as W grows, which keeps or lowers that key; a context that grows W beats every kept score,
// and so the top list's; within the batch a k-th score only rises and a bin's largest key only falls). A superset
// of the rows the merges take: they look at these rows only (Candidates) and copy them from here, in cache,
// instead of from the whole layer.
struct Gather {
  std::vector<float> top, bottom;  // [units]: the k-th kept score (+inf: no list)
  struct Sample {
    std::vector<Binning> binning;  // [units]
    std::vector<int64_t> worst;    // [units, bins]
  };
  std::vector<Sample> samples;
  const int64_t* batch_keys;  // [batch]
  int64_t* pairs;             // out: [batch * units] capacity, b * units + u ascending per thread
  char* rows;                 // out: [batch * units, tokens] capacity
  int64_t* extremes;          // out: [batch * units, 2] capacity: each row's extreme_position, of its max and min

  bool enters(int64_t b, int64_t u, float high, float low) const {
    if (high > top[u] || -low > bottom[u]) return true;
    if (!(high > 0)) return false;
    for (const Sample& s : samples)
      if (batch_keys[b] < s.worst[u * s.binning[u].n_bins + s.binning[u].of(high)]) return true;
    return false;
  }
};

struct Samples {  // one unit's reservoir: [bins, per] entries, each with [width] activations
  int64_t bins, per, width, item;
  int64_t* keys;
  int64_t* ids;
  int64_t* positions;
  float* values;
  char* acts;

  // Bins (2i, 2i+1) become bin i, keeping the smallest keys (ties: the lower slot); the upper half empties.
  void merge_pairs() {
    const int64_t half = bins / 2, n = bins * per;
    std::vector<int64_t> k(keys, keys + n), id(ids, ids + n), pos(positions, positions + n);
    std::vector<float> val(values, values + n);
    std::vector<char> act(acts, acts + n * width * item);
    std::vector<int64_t> order(2 * per);
    for (int64_t i = 0; i < half; ++i) {
      std::iota(order.begin(), order.end(), 2 * i * per);
      std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return k[x] < k[y]; });
      for (int64_t j = 0; j < per; ++j) {
        const int64_t to = i * per + j, from = order[j];
        keys[to] = k[from];
        ids[to] = id[from];
        positions[to] = pos[from];
        values[to] = val[from];
        std::memcpy(acts + to * width * item, act.data() + from * width * item, width * item);
      }
    }
    for (int64_t to = half * per; to < n; ++to) {
      keys[to] = kNoKey;
      ids[to] = -1;
      positions[to] = 0;
      values[to] = 0;
    }
    std::memset(acts + half * per * width * item, 0, (n - half * per) * width * item);
  }
};


// N rows into the running extremes, sums and firing counts (N > 1: those are loaded and stored once per N rows,
// not per row; they, not the activations, bound the one-row loop). NaN never enters an extreme here: reduce_rows
// makes a context's extremes NaN after, from its sum of squares.
template <typename T, int N>
void accumulate_rows(const T* const* rows, int64_t units, float* __restrict high, float* __restrict low,
                     float* __restrict s1, float* __restrict s2, int32_t* __restrict fires) {
  const T* __restrict p[N];
  for (int i = 0; i < N; ++i) p[i] = rows[i];
  for (int64_t u = 0; u < units; ++u) {
    float h = high[u], l = low[u], a = 0.0f, q = 0.0f;
    int32_t f = 0;
    for (int i = 0; i < N; ++i) {
      const float v = to_float(p[i][u]);
      h = v > h ? v : h;
      l = v < l ? v : l;
      a += v;
      q += v * v;
      f += v > 0.0f;
    }
    high[u] = h;
    low[u] = l;
    s1[u] += a;
    s2[u] += q;
    fires[u] += f;
  }
}

// Contexts b0 to b1: their extremes into context_max and context_min, their sums added to sum, squares and
// firing; with a Gather, each context's rows that may enter a list copied out while it is in cache, into slots
// from b0 * units on. Returns the number gathered.
template <typename T>
int64_t reduce_rows(const T* data, int64_t b0, int64_t b1, int64_t tokens, int64_t units, int64_t sb, int64_t st,
                    const uint8_t* counted, float* context_max, float* context_min, double* sum, double* squares,
                    int64_t* firing, const Gather* gather) {
  std::vector<float> s1(units), s2(units);
  std::vector<int32_t> fires(units);
  std::vector<const T*> rows;
  std::vector<int64_t> entering;
  int64_t gathered = 0;
  for (int64_t b = b0; b < b1; ++b) {
    float* high = context_max + b * units;
    float* low = context_min + b * units;
    std::fill(high, high + units, -std::numeric_limits<float>::infinity());
    std::fill(low, low + units, std::numeric_limits<float>::infinity());
    std::fill(s1.begin(), s1.end(), 0.0f);
    std::fill(s2.begin(), s2.end(), 0.0f);
    std::fill(fires.begin(), fires.end(), 0);
    rows.clear();
    for (int64_t t = 0; t < tokens; ++t)
      if (counted[b * tokens + t]) rows.push_back(data + b * sb + t * st);
    size_t r = 0;
    for (; r + 8 <= rows.size(); r += 8)
      accumulate_rows<T, 8>(&rows[r], units, high, low, s1.data(), s2.data(), fires.data());
    for (; r < rows.size(); ++r)
      accumulate_rows<T, 1>(&rows[r], units, high, low, s1.data(), s2.data(), fires.data());
    // A sum of squares is NaN only from a NaN: then the extremes are too, as torch's amax gives (checked in a loop
    // of its own, which vectorises; NaN is rare)
    bool nan = false;
    for (int64_t u = 0; u < units; ++u) nan |= s2[u] != s2[u];
    for (int64_t u = 0; nan && u < units; ++u)
      if (s2[u] != s2[u]) high[u] = low[u] = std::numeric_limits<float>::quiet_NaN();
    for (int64_t u = 0; u < units; ++u) {
      sum[u] += s1[u];
      squares[u] += s2[u];
      firing[u] += fires[u];
    }
    if (gather == nullptr) continue;
    entering.clear();
    for (int64_t u = 0; u < units; ++u)
      if (gather->enters(b, u, high[u], low[u])) entering.push_back(u);
    const int64_t slot = b0 * units + gathered;
    T* out = reinterpret_cast<T*>(gather->rows) + slot * tokens;
    int64_t* at = gather->extremes + slot * 2;
    const size_t n = entering.size();
    const T* block = data + b * sb;
    for (size_t i = 0; i < n; ++i) {  // each row's tokens: independent loads from the block in cache
      const int64_t u = entering[i];
      T* to = out + i * tokens;
      for (int64_t t = 0; t < tokens; ++t) to[t] = block[t * st + u];
      const uint8_t* c = counted + b * tokens;
      const float most = high[u], least = low[u];
      int32_t max_at = int32_t(tokens), min_at = int32_t(tokens);  // the first counted positions holding them
      for (int32_t t = 0; t < int32_t(tokens); ++t) {  // a min-reduction, which vectorises; no early exit
        const float v = to_float(to[t]);
        max_at = std::min(max_at, c[t] && v == most ? t : int32_t(tokens));
        min_at = std::min(min_at, c[t] && v == least ? t : int32_t(tokens));
      }
      at[2 * i] = max_at < tokens ? max_at : -1;
      at[2 * i + 1] = min_at < tokens ? min_at : -1;
    }
    for (size_t i = 0; i < n; ++i) gather->pairs[slot + i] = b * units + entering[i];
    gathered += n;
  }
  return gathered;
}

// histogram_update's loop for one element type. Each thread takes its units a tile at a time through every
// sampled token, counting into 16-bit counters of its own laid out bin by bin (a tile's bins 64 bytes apart, in
// L1), then adds the bins the tile reached into counts. Counting into counts directly missed the cache on most
// increments: its bins are 12 KB apart for SmolLM2's 1,536 neurons, so a unit's fall in the same few cache sets.
// Uncounted positions (BOS, padding) are added up once per unit.
template <typename T>
void histogram_rows(const T* data, int64_t batch, int64_t tokens, int64_t units, int64_t sb, int64_t st, int64_t su,
                    const uint8_t* counted, const int64_t* batch_keys, int64_t every, int64_t half,
                    int64_t first_code, int64_t* counts, int threads) {
  constexpr int64_t kTile = 32;
  const int64_t uncounted = 2 * half + 1;
  std::vector<const T*> rows;
  int64_t skipped = 0;
  for (int64_t b = 0; b < batch; ++b) {
    if (batch_keys[b] % every != 0) continue;
    for (int64_t t = 0; t < tokens; ++t) {
      if (counted[b * tokens + t])
        rows.push_back(data + b * sb + t * st);
      else
        ++skipped;
    }
  }
  if (rows.empty() && skipped == 0) return;
#pragma omp parallel num_threads(threads)
  {
    const auto [me, lo, hi] = my_share(units);
    const int64_t n_columns = 2 * half + 1;
    int32_t columns[kTile];
    std::vector<uint16_t> local(n_columns * kTile, 0);  // [column, tile unit]: rows 64 B apart, no two in one set
    for (int64_t u = lo; u < hi; ++u) counts[uncounted * units + u] += skipped;
    for (int64_t u0 = lo; u0 < hi; u0 += kTile) {
      const int64_t n = std::min(kTile, hi - u0);
      for (size_t r0 = 0; r0 < rows.size(); r0 += 65535) {  // at most 65,535 counts per uint16 between flushes
        int32_t low_column = int32_t(n_columns), high_column = -1;
        for (size_t r = r0; r < std::min(rows.size(), r0 + 65535); ++r) {
          const T* row = rows[r];
          for (int64_t i = 0; i < n; ++i) {
            const float v = to_float(row[(u0 + i) * su]);
            uint32_t bits;
            std::memcpy(&bits, &v, 4);
            const int32_t raw = int32_t(bits) >> 21;
            const int32_t code = raw & 1023;
            const int32_t magnitude =
                code == 0 ? 0 : std::min(std::max(code - int32_t(first_code), int32_t(1)), int32_t(half));
            columns[i] = int32_t(half) + (raw < 0 ? -magnitude : magnitude);
          }
          for (int64_t i = 0; i < n; ++i) {
            ++local[columns[i] * kTile + i];
            low_column = std::min(low_column, columns[i]);
            high_column = std::max(high_column, columns[i]);
          }
        }
        for (int32_t c = low_column; c <= high_column; ++c) {
          uint16_t* from = local.data() + c * kTile;
          int64_t* to = counts + c * units + u0;
          for (int64_t i = 0; i < n; ++i) to[i] += from[i];
          std::fill(from, from + kTile, uint16_t(0));
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// Top-k (TopK.update, and TopK.update_pairs for sparse units): scores float32 at [b * ssb + u * ssu], each
// context's max (or minus its min, with largest = 0; -inf where a sparse unit does not fire); entering rows are
// copied from the dense activations, or where `pairs` is set from a sparse source's pairs or the reduction's
// gathered rows (see Rows). Lists in rank order, slot_acts [units, k, width] in slots that never move. A context
// enters after every kept one scoring at least as much: kept contexts and earlier rows have lower ids, and ties go
// to the lower id.
void topk_update(const void* acts, int dtype, int64_t item, int64_t batch, int64_t tokens, int64_t units,
                 int64_t sb, int64_t st, int64_t su, const int64_t* pairs, int64_t n_pairs, const int64_t* starts,
                 const int64_t* pair_positions, const void* pair_bits, const int64_t* pair_extremes,
                 const float* scores, int64_t ssb, int64_t ssu, const uint8_t* counted, int64_t first,
                 const int64_t* batch_ids, int largest, int64_t k, int64_t width, float* values, int64_t* ids,
                 int64_t* positions, int64_t* slots, void* slot_acts, int threads) {
  const Rows source{{static_cast<const char*>(acts), dtype, item, batch, tokens, units, sb, st, su}, pairs, n_pairs,
                    starts, pair_positions, static_cast<const char*>(pair_bits), pair_extremes};
#pragma omp parallel num_threads(threads)
  {
    std::vector<int64_t> from_row(k);   // per rank: the batch row of an entry from this batch, else -1
    std::vector<Copy> copies, scratch;  // only the entries that stay are copied, once the thread's units merged
    std::vector<int64_t> start;
    const auto [me, lo, hi] = my_share(units);
    const Candidates candidates(source, batch, lo, hi);
    for (int64_t u = lo; u < hi; ++u) {
      if (candidates.none(u)) continue;
      float* value = values + u * k;
      int64_t *id = ids + u * k, *position = positions + u * k, *slot = slots + u * k;
      bool entered = false;
      candidates.each(u, [&](int64_t b) {
        const float s = scores[b * ssb + u * ssu];
        if (!(s > value[k - 1])) return;  // the bar only rises
        if (!entered) std::fill(from_row.begin(), from_row.end(), -1);
        entered = true;
        int64_t rank = k - 1;
        while (rank > 0 && value[rank - 1] < s) --rank;
        const int64_t freed = slot[k - 1];  // the last kept context's slot: it drops out
        for (int64_t j = k - 1; j > rank; --j) {
          value[j] = value[j - 1];
          id[j] = id[j - 1];
          position[j] = position[j - 1];
          slot[j] = slot[j - 1];
          from_row[j] = from_row[j - 1];
        }
        value[rank] = s;
        id[rank] = batch_ids[b];
        slot[rank] = freed;
        from_row[rank] = b;
      });
      if (!entered) continue;
      for (int64_t r = 0; r < k; ++r)
        if (from_row[r] >= 0) copies.push_back({from_row[r], u, r});
    }
    by_row(copies, batch, scratch, start);  // this thread's units only: no other thread writes them
    source.copy_all(
        copies, counted, first, width, largest != 0,
        [&](const Copy& c) {
          return static_cast<char*>(slot_acts) + (c.u * k + slots[c.u * k + c.index]) * width * item;
        },
        [&](const Copy& c) { return positions + c.u * k + c.index; });
  }
}

// Seeded samples (Reservoir.update and update_pairs): context_max float32 at [b * ssb + u * ssu] (-inf where a
// sparse unit does not fire), rows as for topk_update; per unit, n_bins bins of
// `per` entries holding the smallest keys among contexts whose max falls in the bin (see reservoir.py: W grows
// to the power of two above the unit's max, merging bins in pairs per doubling, before the batch is binned).
void reservoir_update(const void* acts, int dtype, int64_t item, int64_t batch, int64_t tokens, int64_t units,
                      int64_t sb, int64_t st, int64_t su, const int64_t* pairs, int64_t n_pairs,
                      const int64_t* starts, const int64_t* pair_positions, const void* pair_bits,
                      const int64_t* pair_extremes, const float* context_max, int64_t ssb, int64_t ssu,
                      const uint8_t* counted, int64_t first,
                      const int64_t* batch_ids, const int64_t* batch_keys, int64_t n_bins, int64_t per,
                      int64_t width, int64_t* exponent, int64_t* keys, int64_t* ids, int64_t* positions,
                      float* values, void* sample_acts, int threads) {
  const Rows source{{static_cast<const char*>(acts), dtype, item, batch, tokens, units, sb, st, su}, pairs, n_pairs,
                    starts, pair_positions, static_cast<const char*>(pair_bits), pair_extremes};
  const int64_t n = n_bins * per;
#pragma omp parallel num_threads(threads)
  {
    std::vector<int64_t> from_row(n);  // per entry: the batch row of an entry from this batch, else -1
    std::vector<int64_t> worst(n_bins), worst_slot(n_bins);  // per bin: its largest kept key, and where
    std::vector<Copy> copies, scratch;  // only the entries that stay are copied, once the thread's units merged
    std::vector<int64_t> start;
    const auto [me, lo, hi] = my_share(units);
    const Candidates candidates(source, batch, lo, hi);
    // Each unit's batch max, and whether a context max is NaN, read in memory order (a dense unit's column, its
    // rows 6 KB apart, would fall in a couple of cache sets)
    std::vector<float> most(hi - lo, -std::numeric_limits<float>::infinity());
    std::vector<uint8_t> nans(hi - lo, 0);
    const auto take = [&](int64_t b, int64_t u) {
      const float x = context_max[b * ssb + u * ssu];
      nans[u - lo] |= x != x;
      most[u - lo] = x > most[u - lo] ? x : most[u - lo];
    };
    for (int64_t b = 0; n_bins > 1 && ssu == 1 && b < batch; ++b)
      for (int64_t u = lo; u < hi; ++u) take(b, u);
    for (int64_t u = lo; n_bins > 1 && ssu != 1 && u < hi; ++u)
      for (int64_t b = 0; b < batch; ++b) take(b, u);
    for (int64_t u = lo; u < hi; ++u) {
      Samples s{n_bins, per, width, item, keys + u * n, ids + u * n, positions + u * n, values + u * n,
                static_cast<char*>(sample_acts) + u * n * width * item};
      if (n_bins > 1) {
        const float batch_max = most[u - lo];
        const bool nan = nans[u - lo];
        int e = 0;
        std::frexp(batch_max, &e);
        const int64_t needed = !nan && batch_max > 0 ? e : kNoExponent;
        if (needed > exponent[u]) {
          const bool fired_before = exponent[u] != kNoExponent;
          const int64_t doublings = std::min<int64_t>(needed - exponent[u], 64);
          exponent[u] = needed;
          for (int64_t i = 0; fired_before && i < doublings; ++i) s.merge_pairs();
        }
      }
      if (candidates.none(u)) continue;
      std::fill(from_row.begin(), from_row.end(), -1);
      const Binning binning(exponent[u], n_bins);
      worst_of(s.keys, n_bins, per, worst.data(), worst_slot.data());
      candidates.each(u, [&](int64_t b) {
        const float x = context_max[b * ssb + u * ssu];
        if (!(x > 0)) return;
        const int64_t bin = binning.of(x);
        if (!(batch_keys[b] < worst[bin])) return;
        const int64_t at = worst_slot[bin];
        s.keys[at] = batch_keys[b];
        s.ids[at] = batch_ids[b];
        s.values[at] = x;
        from_row[at] = b;
        worst_of(s.keys + bin * per, 1, per, &worst[bin], &worst_slot[bin]);
        worst_slot[bin] += bin * per;
      });
      for (int64_t j = 0; j < n; ++j)
        if (from_row[j] >= 0) copies.push_back({from_row[j], u, j});
    }
    by_row(copies, batch, scratch, start);
    source.copy_all(
        copies, counted, first, width, true,
        [&](const Copy& c) { return static_cast<char*>(sample_acts) + (c.u * n + c.index) * width * item; },
        [&](const Copy& c) { return positions + c.u * n + c.index; });
  }
}

// The statistics' histogram of dense units (Statistics._update_histogram): every token of the contexts whose
// key is a multiple of `every`, each activation counted in the column statistics.py reads off its float bits
// (sign, exponent, top two mantissa bits); uncounted positions (BOS, padding) go to the last row, never read.
// counts [half * 2 + 2, units] int64. Each thread owns a range of units, reading the rows in memory order.
void histogram_update(const void* acts, int dtype, int64_t /*item*/, int64_t batch, int64_t tokens, int64_t units,
                      int64_t sb, int64_t st, int64_t su, const uint8_t* counted, const int64_t* batch_keys,
                      int64_t every, int64_t half, int64_t first_code, int64_t* counts, int threads) {
  by_dtype(acts, dtype, [&](auto data) {
    histogram_rows(data, batch, tokens, units, sb, st, su, counted, batch_keys, every, half, first_code, counts,
                   threads);
  });
}

// Per-context extremes and per-unit sums of dense units (reductions.reduce_eager's results): for each context,
// the max and min over its counted positions (-inf and inf where none, NaN where one is NaN); per unit, the counted
// tokens' sum and sum of squares (in double: float32 within a context, then added up) and firing count
// (activation > 0). The units must be innermost (unit stride 1), so each thread streams whole rows of its own
// contexts.
//
// With `pairs` set, it also gathers the rows that may enter a list or sample (see Gather: top is the top list's kept
// scores, bottom the bottom list's or null, samples_* the reservoirs' states, n_samples of them), each context's while its
// block is in cache: pairs (b * units + u, ascending), their rows [n, tokens] in the activations' dtype and the
// positions of each one's max and min [n, 2] (extreme_position's), each with room for batch * units. Returns how many (0 without pairs): topk_update and reservoir_update read them.
int64_t reduce(const void* acts, int dtype, int64_t item, int64_t batch, int64_t tokens, int64_t units, int64_t sb,
               int64_t st, const uint8_t* counted, float* context_max, float* context_min, double* sum,
               double* squares, int64_t* firing, const float* top, int64_t top_k, const float* bottom,
               int64_t bottom_k, int n_samples, const int64_t* samples_bins, const int64_t* samples_per,
               const int64_t* const* samples_exponent, const int64_t* const* samples_keys,
               const int64_t* batch_keys, int64_t* pairs, void* rows, int64_t* extremes, int threads) {
  const float inf = std::numeric_limits<float>::infinity();
  Gather gather{std::vector<float>(units, inf), std::vector<float>(units, inf), {}, batch_keys, pairs,
                static_cast<char*>(rows), extremes};
  for (int64_t u = 0; pairs != nullptr && u < units; ++u) {
    if (top != nullptr) gather.top[u] = top[u * top_k + top_k - 1];
    if (bottom != nullptr) gather.bottom[u] = bottom[u * bottom_k + bottom_k - 1];
  }
  for (int r = 0; pairs != nullptr && r < n_samples; ++r) {
    const int64_t bins = samples_bins[r], per = samples_per[r];
    Gather::Sample& s = gather.samples.emplace_back();
    s.worst.resize(units * bins);
    for (int64_t u = 0; u < units; ++u) {
      s.binning.emplace_back(samples_exponent[r][u], bins);
      worst_of(samples_keys[r] + u * bins * per, bins, per, s.worst.data() + u * bins, nullptr);
    }
  }
  // Each thread sums its own contexts into its own row; the rows are added in thread order (deterministic).
  std::vector<double> sums(size_t(threads) * units * 2, 0.0);
  std::vector<int64_t> fires(size_t(threads) * units, 0);
  std::vector<int64_t> gathered(threads, 0), first_slot(threads, 0);
#pragma omp parallel num_threads(threads)
  {
    const auto [me, b0, b1] = my_share(batch);
    double* my_sum = sums.data() + size_t(me) * units * 2;
    double* my_squares = my_sum + units;
    int64_t* my_fires = fires.data() + size_t(me) * units;
    first_slot[me] = b0 * units;
    gathered[me] = by_dtype(acts, dtype, [&](auto data) {
      return reduce_rows(data, b0, b1, tokens, units, sb, st, counted, context_max, context_min, my_sum,
                         my_squares, my_fires, pairs != nullptr ? &gather : nullptr);
    });
  }
  for (int me = 0; me < threads; ++me)
    for (int64_t u = 0; u < units; ++u) {
      sum[u] += sums[size_t(me) * units * 2 + u];
      squares[u] += sums[size_t(me) * units * 2 + units + u];
      firing[u] += fires[size_t(me) * units + u];
    }
  int64_t n = 0;  // each thread's gathered rows moved down after the ones before
  for (int me = 0; me < threads; ++me) {
    if (n != first_slot[me]) {
      std::memmove(pairs + n, pairs + first_slot[me], gathered[me] * sizeof(int64_t));
      std::memmove(gather.rows + n * tokens * item, gather.rows + first_slot[me] * tokens * item,
                   gathered[me] * tokens * item);
      std::memmove(extremes + n * 2, extremes + first_slot[me] * 2, gathered[me] * 2 * sizeof(int64_t));
    }
    n += gathered[me];
  }
  return n;
}

// A sparse source's non-zeros (nonzeros: flat indices into [batch, tokens, units], by ascending position, as
// torch's nonzero or a top-k encode lists them; nonzero_values: theirs, in the same order, gathered by torch,
// whose parallel gather beats this loop's cache misses) grouped by (batch row, unit) pair for Rows: pairs
// ascending, each pair's positions ascending with their values' bits. Also each firing pair's context max into
// scores [units, batch] (left as it is, -inf, elsewhere): as reductions.firing, the max of its counted non-zeros
// fires where it is above 0 (a NaN among them makes it NaN: no fire). And, in the order given, the counted
// non-zeros' units and values for the statistics (the first *n_counted of each). Returns the number of pairs.
int64_t sparse_index(const void* nonzero_values, int dtype, int64_t item, int64_t batch, int64_t tokens,
                     int64_t units, const int64_t* nonzeros, int64_t nnz, const uint8_t* counted,
                     int64_t* pairs, int64_t* starts, int64_t* positions, void* bits, float* scores,
                     int64_t* counted_units, void* counted_values, int64_t* n_counted) {
  const char* in = static_cast<const char*>(nonzero_values);
  char* out = static_cast<char*>(bits);
  char* values = static_cast<char*>(counted_values);
  std::vector<int64_t> count(units), next(units);
  std::vector<int64_t> unit_of, position_of;  // of the row's non-zeros: one division each, not three
  int64_t n_pairs = 0, j = 0, m = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t end = std::lower_bound(nonzeros + j, nonzeros + nnz, (b + 1) * tokens * units) - nonzeros;
    unit_of.resize(end - j);
    position_of.resize(end - j);
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = j; i < end; ++i) {
      const int64_t flat_position = nonzeros[i] / units;
      unit_of[i - j] = nonzeros[i] - flat_position * units;
      position_of[i - j] = flat_position - b * tokens;
      ++count[unit_of[i - j]];
    }
    const int64_t first_pair = n_pairs;
    for (int64_t u = 0, at = j; u < units; ++u) {  // each unit's range, in unit order (a counting sort)
      if (count[u] == 0) continue;
      pairs[n_pairs] = b * units + u;
      starts[n_pairs++] = at;
      next[u] = at;
      at += count[u];
    }
    for (int64_t i = j; i < end; ++i) {  // stable: each pair's positions stay ascending
      const int64_t u = unit_of[i - j], t = position_of[i - j], to = next[u]++;
      positions[to] = t;
      copy_item(out + to * item, in + i * item, item);
      if (counted[b * tokens + t]) {
        counted_units[m] = u;
        copy_item(values + m++ * item, out + to * item, item);
      }
    }
    by_dtype(out, dtype, [&](auto typed) {
      for (int64_t p = first_pair; p < n_pairs; ++p) {
        const int64_t u = pairs[p] - b * units, stop = p + 1 < n_pairs ? starts[p + 1] : end;
        float best = -std::numeric_limits<float>::infinity();
        bool nan = false;
        for (int64_t i = starts[p]; i < stop; ++i) {
          if (!counted[b * tokens + positions[i]]) continue;
          const float v = to_float(typed[i]);
          nan |= std::isnan(v);
          best = std::max(best, v);
        }
        if (best > 0 && !nan) scores[u * batch + b] = best;
      }
    });
    j = end;
  }
  starts[n_pairs] = nnz;
  *n_counted = m;
  return n_pairs;
}

}  // extern "C"

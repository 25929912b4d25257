/* Rows of text from columns, compiled: the bulk side of decode's line and JSON outputs.
 *
 * Formatting a million lines in Python costs tens of seconds, one object per field per packet.
 * Here a *template* (a list of items: literal bytes, or a column to print) is applied to every
 * row, into one bytes object. What to print stays in Python (render.py, frames.py): names,
 * flag lists and anomaly lists arrive dictionary-encoded (a code per row and the strings), so
 * no name or rule is defined twice. Every index is checked against its column.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

enum {
    K_LIT = 0,     /* (K_LIT, bytes) */
    K_INT = 1,     /* (K_INT, int64 column, width): decimal, right-aligned in width */
    K_UINT = 2,    /* (K_UINT, uint64 column) */
    K_REL = 3,     /* (K_REL, int64 ns column, t0, width): "%.6f" s since t0, right-aligned */
    K_EPOCH = 4,   /* (K_EPOCH, int64 ns column): repr(ns / 10**9), correctly rounded */
    K_STR = 5,     /* (K_STR, int32 code column, tuple of bytes) */
    K_PREVIEW = 6, /* (K_PREVIEW, int64 offset column, int64 length column, buf, limit,
                      prefix): render.preview of buf[off:off+len], after prefix, if any */
    K_OPT = 7,     /* (K_OPT, list of bytes or None, prefix): prefix + text where not None */
    K_FLOAT = 8,   /* (K_FLOAT, float64 column): repr(value), Python's own shortest digits */
};
/* K_INT, K_UINT, K_FLOAT and K_STR take two more, optional, elements: a bool column and
 * bytes written instead of the value where the column is true (JSON's null, CSV's empty
 * field), so a record's missing values need no Python object each. */

typedef struct {
    int kind;
    Py_buffer col, col2, data, missing;
    int has_col, has_col2, has_data, has_missing;
    Py_ssize_t width;
    long long t0;
    PyObject *obj;   /* K_LIT: bytes; K_STR: tuple; K_OPT: list */
    PyObject *prefix;
    PyObject *absent; /* written where missing (see K_FLOAT) */
    char *pad;        /* K_LIT: its text; K_STR: the strings end to end; PAD spare bytes after */
    Py_ssize_t *offs; /* K_STR: where string k starts in pad (and its end, offs[k + 1]) */
} Item;

#define PAD 32
/* Literals and names are copied PAD bytes at a time from copies with PAD spare bytes after
 * them: a copy of a size the compiler knows is two moves, where memcpy of a size it does
 * not know is a call (a fifth of decode --json's time, 33 of them per row). */

/* The text is written straight into the bytes object returned (grown by realloc, which
 * moves big blocks without copying them): no second copy of hundreds of megabytes. */
typedef struct {
    PyObject *bytes;
    char *p;
    Py_ssize_t n, cap;
    Py_ssize_t rows, done; /* rows to write, rows written */
    int raw;               /* write_rows: p is a raw buffer reused piece after piece, and
                              the rows are written without the GIL (see gil_take) */
    PyThreadState *ts;     /* while the GIL is let go: this thread's state, to take it back */
} Out;

/* write_rows lets other threads run while it formats and writes rows (`decode` gathers
 * the next rows meanwhile, on the other core): everything it reads is C memory or objects
 * its caller holds and nobody changes. It takes the GIL back only to call Python's float
 * formatting and to raise; every error path returns holding it. Its buffer is raw memory,
 * grown without the GIL: a thread that waits for the GIL waits for the other thread's
 * switch interval (5 ms), and with a GIL round trip per buffer growth and per 4096 rows
 * the overlap gained 1.16x where it now gains 1.4x (measured, `decode --json`). */
static inline void gil_take(Out *o)
{
    if (o->ts) {
        PyEval_RestoreThread(o->ts);
        o->ts = NULL;
    }
}

static inline void gil_give(Out *o)
{
    if (o->raw && !o->ts)
        o->ts = PyEval_SaveThread();
}

static int out_grow(Out *o, Py_ssize_t more)
{
    Py_ssize_t cap = o->cap ? 2 * o->cap : 1 << 16;
    /* rather what the rows written so far foretell for all of them, and an eighth: one or
     * two moves of the block, where doubling makes a dozen */
    if (o->done > 0) {
        double foretold = (double)o->n / (double)o->done * (double)o->rows * 1.125;
        if (foretold > (double)cap && foretold < (double)PY_SSIZE_T_MAX / 2)
            cap = (Py_ssize_t)foretold;
    }
    while (cap < o->n + more)
        cap *= 2;
    if (o->raw) {
        char *p = PyMem_RawRealloc(o->p, (size_t)cap);
        if (!p) {
            gil_take(o);
            PyErr_NoMemory();
            return -1;
        }
        o->p = p;
        o->cap = cap;
        return 0;
    }
    if (!o->bytes)
        o->bytes = PyBytes_FromStringAndSize(NULL, cap);
    else if (_PyBytes_Resize(&o->bytes, cap) < 0)
        o->bytes = NULL; /* freed by _PyBytes_Resize */
    if (!o->bytes)
        return -1;
    o->p = PyBytes_AS_STRING(o->bytes);
    o->cap = cap;
    return 0;
}

static inline int out_reserve(Out *o, Py_ssize_t more)
{
    return o->n + more <= o->cap ? 0 : out_grow(o, more);
}

static inline int out_put(Out *o, const char *s, Py_ssize_t n)
{
    if (out_reserve(o, n) < 0)
        return -1;
    memcpy(o->p + o->n, s, (size_t)n);
    o->n += n;
    return 0;
}

static inline int out_padded(Out *o, const char *s, Py_ssize_t n, Py_ssize_t width)
{
    if (out_reserve(o, (width > n ? width : n)) < 0)
        return -1;
    while (width-- > n)
        o->p[o->n++] = ' ';
    memcpy(o->p + o->n, s, (size_t)n);
    o->n += n;
    return 0;
}

static const char PAIRS[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

/* Decimal digits of v into the end of tmp[24]; returns where they start (snprintf costs
 * more than the rest of a line; two digits per division halve the divisions). */
static char *u64_digits(uint64_t v, char *end)
{
    char *p = end;
    while (v >= 100) {
        const char *d = PAIRS + 2 * (v % 100);
        v /= 100;
        *--p = d[1];
        *--p = d[0];
    }
    if (v >= 10) {
        *--p = PAIRS[2 * v + 1];
        *--p = PAIRS[2 * v];
    } else {
        *--p = (char)('0' + v);
    }
    return p;
}

/* n bytes of s, which has PAD readable bytes after its end (see PAD) */
static inline int out_short(Out *o, const char *s, Py_ssize_t n)
{
    if (out_reserve(o, n + PAD) < 0)
        return -1;
    if (n <= PAD)
        memcpy(o->p + o->n, s, PAD);
    else
        memcpy(o->p + o->n, s, (size_t)n);
    o->n += n;
    return 0;
}

static inline Py_ssize_t ndigits(uint64_t v)
{
    Py_ssize_t n = 1;
    for (;;) {
        if (v < 10)
            return n;
        if (v < 100)
            return n + 1;
        if (v < 1000)
            return n + 2;
        if (v < 10000)
            return n + 3;
        v /= 10000;
        n += 4;
    }
}

/* v in decimal (after '-' when neg), right-aligned in width, written in place. */
static int out_u64(Out *o, uint64_t v, int neg, Py_ssize_t width)
{
    Py_ssize_t n = ndigits(v) + (neg != 0);
    if (out_reserve(o, n > width ? n : width) < 0)
        return -1;
    char *p = o->p + o->n;
    for (Py_ssize_t k = n; k < width; k++)
        *p++ = ' ';
    if (neg)
        *p = '-';
    u64_digits(v, p + n);
    o->n = p + n - o->p;
    return 0;
}

static int out_int(Out *o, int64_t v, Py_ssize_t width)
{
    return out_u64(o, v < 0 ? 0 - (uint64_t)v : (uint64_t)v, v < 0, width);
}

/* "%.6f" of (ns - t0) / 1e9 as a double, right-aligned. Exact integer arithmetic gives the
 * same digits when the difference is non-negative, below 2^50 ns (the double's error stays
 * far below a microsecond's thousandth) and not a half-microsecond tie; else printf. */
static int out_rel(Out *o, int64_t ns, int64_t t0, Py_ssize_t width)
{
    char tmp[48];
    int64_t d = ns - t0;
    if (d >= 0 && d < ((int64_t)1 << 50) && d % 1000 != 500) {
        int64_t us = d / 1000 + (d % 1000 > 500);
        char *end = tmp + sizeof tmp, *p = end;
        int64_t frac = us % 1000000;
        for (int k = 0; k < 6; k++) {
            *--p = (char)('0' + frac % 10);
            frac /= 10;
        }
        *--p = '.';
        p = u64_digits((uint64_t)(us / 1000000), p);
        return out_padded(o, p, end - p, width);
    }
    int n = snprintf(tmp, sizeof tmp, "%.6f", (double)d / 1e9);
    return out_padded(o, tmp, n, width);
}

static const char ELLIPSIS[] = "\xe2\x80\xa6"; /* … */

/* render.preview: printable ASCII (and tab, LF, CR) in quotes with unicode_escape's escapes
 * and '"' escaped, else hex; "…" when the data is longer than limit. */
static int out_preview(Out *o, const uint8_t *d, Py_ssize_t len, Py_ssize_t limit)
{
    Py_ssize_t head = len < limit ? len : limit;
    int text = head > 0;
    for (Py_ssize_t i = 0; i < head && text; i++)
        text = (d[i] >= 32 && d[i] < 127) || d[i] == 9 || d[i] == 10 || d[i] == 13;
    if (out_reserve(o, 2 * head + 8) < 0)
        return -1;
    char *p = o->p + o->n;
    if (text) {
        *p++ = '"';
        for (Py_ssize_t i = 0; i < head; i++) {
            uint8_t c = d[i];
            switch (c) {
            case '\\': *p++ = '\\'; *p++ = '\\'; break;
            case '\t': *p++ = '\\'; *p++ = 't'; break;
            case '\n': *p++ = '\\'; *p++ = 'n'; break;
            case '\r': *p++ = '\\'; *p++ = 'r'; break;
            case '"': *p++ = '\\'; *p++ = '"'; break;
            default: *p++ = (char)c;
            }
        }
        *p++ = '"';
    } else {
        static const char hex[] = "0123456789abcdef";
        for (Py_ssize_t i = 0; i < head; i++) {
            *p++ = hex[d[i] >> 4];
            *p++ = hex[d[i] & 15];
        }
    }
    if (len > limit) {
        memcpy(p, ELLIPSIS, 3);
        p += 3;
    }
    o->n = p - o->p;
    return 0;
}

/* repr(ns / 10**9) for 10^9 <= ns < 2^63, without strtod, dtoa or a string in between:
 * the characters are written before `end`, and their start returned; NULL when a case the
 * argument below does not cover comes up (the caller then asks Python's own functions).
 *
 * Why it is the same string. Let D = ns / 10^9 exactly and x the double Python's int / int
 * gives: D correctly rounded (half to even), x = m 2^-t with 2^52 <= m < 2^53. repr(x) is
 * the shortest decimal that reads back as x, the one nearest x among several (dtoa mode 0),
 * in fixed notation with at least one fractional digit (1 <= x < 10^16). A decimal reads
 * back as x when it lies strictly inside (x - u/2, x + u/2), u = 2^-t, t >= 18. No candidate
 * lies on an edge: a multiple of 10^-9 is not an odd multiple of 2^-(t+1). Where x is a
 * power of two (m = 2^52, a smaller gap below) it is a whole number, found at f = 0 below.
 * When two candidates are equally near, repr rounds to even: we give up (NULL) there.
 * For x >= 1 fewer fractional digits mean fewer significant digits, so repr(x) is, for the
 * least f = 0..9 where it exists, the multiple of 10^-f nearest x inside the interval: at
 * each f only the multiples just below and just above x can be nearest, and no other
 * multiple of 10^-f is inside when the nearer of those two is not. There is always one at
 * f = 9 (D itself), and the least f leaves no trailing zero (that multiple would be nearest
 * at f - 1 too). Everything is exact integer arithmetic in units
 * of U = 2^-t 10^-9 s: x = m 10^9 U, D = ns 2^t U, u/2 = 5 10^8 U. tests/test_render.py
 * holds it equal to repr over boundaries, sub-second parts and times beyond 2^32 s. */
/* The fixed-point text of digits / 10^f with f decimals ("W.0" when f is 0), written
   backwards to end: what the exact epoch and float formatters both end with. */
static char *fixed_digits(uint64_t digits, int f, char *end)
{
    char *s = end;
    if (f == 0) {
        *--s = '0';
    } else {
        for (int k = 0; k < f; k++) {
            *--s = (char)('0' + digits % 10);
            digits /= 10;
        }
    }
    *--s = '.';
    return u64_digits(digits, s);
}

#ifdef __SIZEOF_INT128__
static char *epoch_repr(uint64_t ns, char *end)
{
    static const uint64_t POW10[10] = {1, 10, 100, 1000, 10000, 100000, 1000000, 10000000,
                                       100000000, 1000000000};
    const uint64_t BILLION = 1000000000u;
    if (ns < BILLION || ns >> 63)
        return NULL;
    int t = 82 - (64 - __builtin_clzll(ns)); /* 10^9 ~ 2^30: m near 2^52 */
    unsigned __int128 scaled, q, r;
    for (;;) {
        scaled = (unsigned __int128)ns << t;
        q = scaled / BILLION;
        if (q >= ((unsigned __int128)1 << 53))
            t--;
        else if (q < ((unsigned __int128)1 << 52))
            t++;
        else
            break;
    }
    r = scaled - q * BILLION;
    uint64_t m = (uint64_t)q;
    /* never a tie (2r = 10^9 would make 2^(t-8) ns / 5^9 an odd integer: 5^9 | ns makes it
     * even, t >= 18), so rounding half up is rounding half to even */
    if (2 * r > BILLION)
        m++;
    const int64_t half = 500000000, unit = (int64_t)1 << t; /* u/2, and 1 ns, in U */
    int64_t delta = (int64_t)((__int128)m * BILLION - (__int128)scaled); /* x - D, in U */
    /* x, in nanoseconds, lies in [base, base + 1) */
    uint64_t base = ns + (uint64_t)(delta >= 0 ? delta / unit : -((unit - 1 - delta) / unit));
    /* a candidate c inside is within u of D: |c - ns| < 10^9 / 2^t + 1 nanoseconds */
    int64_t reach = (int64_t)(BILLION >> t) + 1;
    for (int f = 0; f <= 9; f++) {
        uint64_t p = POW10[9 - f], below = base - base % p; /* below <= x < below + p */
        int64_t best = 0, best_err = -1;
        int tie = 0;
        for (int side = 0; side < 2; side++) {
            int64_t off = (int64_t)(below + (side ? p : 0) - ns); /* c - ns */
            if (off >= reach || -off >= reach)
                continue;
            int64_t err = off * unit - delta, a = err < 0 ? -err : err; /* |c - x| */
            if (a >= half)
                continue;
            if (best_err < 0 || a < best_err) {
                best = off;
                best_err = a;
                tie = 0;
            } else if (a == best_err) {
                tie = 1;
            }
        }
        if (best_err < 0)
            continue;
        if (tie)
            return NULL;
        uint64_t c = ns + (uint64_t)best; /* c / p: its seconds and f decimals, as digits */
        return fixed_digits(c / p, f, end);
    }
    return NULL;
}
#else /* no 128-bit integers (a 32-bit machine): Python's own functions, as before */
static char *epoch_repr(uint64_t ns, char *end)
{
    return NULL;
}
#endif

static void items_release(Item *items, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        if (items[i].has_col)
            PyBuffer_Release(&items[i].col);
        if (items[i].has_col2)
            PyBuffer_Release(&items[i].col2);
        if (items[i].has_data)
            PyBuffer_Release(&items[i].data);
        if (items[i].has_missing)
            PyBuffer_Release(&items[i].missing);
        PyMem_Free(items[i].pad);
        PyMem_Free(items[i].offs);
    }
}

/* The padded copies of an item's literal or strings (see PAD); a K_STR tuple holding
 * anything but bytes gets none, and fails where a row uses that entry. */
static int item_pad(Item *it)
{
    if (it->kind == K_LIT) {
        Py_ssize_t n = PyBytes_GET_SIZE(it->obj);
        if (!(it->pad = PyMem_Calloc((size_t)(n + PAD), 1))) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(it->pad, PyBytes_AS_STRING(it->obj), (size_t)n);
        return 0;
    }
    Py_ssize_t k = PyTuple_GET_SIZE(it->obj), total = 0;
    for (Py_ssize_t j = 0; j < k; j++) {
        PyObject *b = PyTuple_GET_ITEM(it->obj, j);
        if (!PyBytes_Check(b))
            return 0;
        total += PyBytes_GET_SIZE(b);
    }
    it->offs = PyMem_Malloc((size_t)(k + 1) * sizeof *it->offs);
    it->pad = PyMem_Calloc((size_t)(total + PAD), 1);
    if (!it->offs || !it->pad) {
        PyErr_NoMemory();
        return -1;
    }
    it->offs[0] = 0;
    for (Py_ssize_t j = 0; j < k; j++) {
        PyObject *b = PyTuple_GET_ITEM(it->obj, j);
        memcpy(it->pad + it->offs[j], PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
        it->offs[j + 1] = it->offs[j] + PyBytes_GET_SIZE(b);
    }
    return 0;
}

/* Parse one item; columns must hold at least `rows` values of their width. */
static int item_parse(PyObject *t, Item *it, Py_ssize_t rows)
{
    memset(it, 0, sizeof *it);
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 1) {
        PyErr_SetString(PyExc_TypeError, "template item must be a tuple");
        return -1;
    }
    it->kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(t, 0));
    if (it->kind == -1 && PyErr_Occurred())
        return -1;
    int ok = 0, kind;
    Py_ssize_t width8 = 8;
    switch (it->kind) {
    case K_LIT:
        ok = PyArg_ParseTuple(t, "iS", &kind, &it->obj);
        break;
    case K_INT:
        ok = PyArg_ParseTuple(t, "iy*n|y*S", &kind, &it->col, &it->width, &it->missing,
                              &it->absent);
        it->has_col = ok;
        break;
    case K_UINT:
    case K_FLOAT:
        ok = PyArg_ParseTuple(t, "iy*|y*S", &kind, &it->col, &it->missing, &it->absent);
        it->has_col = ok;
        break;
    case K_EPOCH:
        ok = PyArg_ParseTuple(t, "iy*", &kind, &it->col);
        it->has_col = ok;
        break;
    case K_REL:
        ok = PyArg_ParseTuple(t, "iy*Ln", &kind, &it->col, &it->t0, &it->width);
        it->has_col = ok;
        break;
    case K_STR:
        ok = PyArg_ParseTuple(t, "iy*O!|y*S", &kind, &it->col, &PyTuple_Type, &it->obj,
                              &it->missing, &it->absent);
        it->has_col = ok;
        width8 = 4;
        break;
    case K_PREVIEW:
        ok = PyArg_ParseTuple(t, "iy*y*y*nS", &kind, &it->col, &it->col2, &it->data, &it->width,
                              &it->prefix);
        it->has_col = it->has_col2 = it->has_data = ok;
        break;
    case K_OPT:
        ok = PyArg_ParseTuple(t, "iO!S", &kind, &PyList_Type, &it->obj, &it->prefix);
        if (ok && PyList_GET_SIZE(it->obj) < rows) {
            PyErr_SetString(PyExc_ValueError, "optional text column too short");
            return -1;
        }
        break;
    default:
        PyErr_SetString(PyExc_ValueError, "unknown template item kind");
        return -1;
    }
    if (!ok)
        return -1;
    it->has_missing = it->missing.obj != NULL;
    if (it->has_missing != (it->absent != NULL)) {
        PyErr_SetString(PyExc_TypeError, "a missing column needs its text, and the text one");
        return -1;
    }
    if (it->has_missing && it->missing.itemsize != 1) {
        PyErr_SetString(PyExc_ValueError, "a missing column holds a byte (bool) a row");
        return -1;
    }
    if ((it->has_col && it->col.len < rows * width8)
        || (it->has_col2 && it->col2.len < rows * 8)
        || (it->has_missing && it->missing.len < rows)) {
        PyErr_SetString(PyExc_ValueError, "column shorter than the rows");
        return -1;
    }
    return it->kind == K_LIT || it->kind == K_STR ? item_pad(it) : 0;
}

/* repr(x) for 10^-4 <= x < 2^53 (fixed notation there), without dtoa: the characters are
 * written before `end`, and their start returned; NULL when a case the argument below does
 * not cover comes up (the caller then asks Python's own function).
 *
 * Why it is the same string. x = m 2^-t exactly, 2^52 <= m < 2^53, 0 <= t <= 66. repr(x)
 * is the shortest decimal that reads back as x, the one nearest x among several (dtoa mode
 * 0). A decimal reads back as x when it lies strictly inside (x - u/2, x + u/2), u = 2^-t,
 * unless m = 2^52 (a smaller gap below: we give up) or it lies on an edge (we give up).
 * As for epoch_repr: for such x fewer fractional digits mean fewer significant digits, so
 * repr(x) is, for the least f where one exists, the multiple k 10^-f nearest x inside the
 * interval; only k0 = floor(x 10^f) and k0 + 1 can be nearest, and when the nearer is not
 * inside neither is the other. A tie between them: we give up. f = 21 always has one (17
 * significant digits), and the least f leaves no trailing zero. Exact integer arithmetic
 * in units of 2^-(t+1) 10^-f: |k 10^-f - x| < u/2 is |2 (k 2^t - m 10^f)| < 10^f, where
 * m 10^f < 2^123. tests/test_render.py holds it equal to repr. */
#ifdef __SIZEOF_INT128__
static char *float_repr(double x, char *end)
{
    if (!(x >= 1e-4 && x < 9007199254740992.0))
        return NULL;
    int e;
    double fr = frexp(x, &e);
    uint64_t m = (uint64_t)ldexp(fr, 53);
    int t = 53 - e;
    if (m == (uint64_t)1 << 52 || t < 0 || t > 66)
        return NULL;
    typedef unsigned __int128 u128;
    const u128 one = 1, low = (one << t) - 1;
    u128 scale = 1;
    for (int f = 0; f <= 21; f++, scale *= 10) {
        u128 prod = (u128)m * scale, k = prod >> t, r = prod & low;
        u128 below = 2 * r, above = 2 * ((one << t) - r); /* |2 (k 2^t - m 10^f)| */
        u128 err = below < above ? below : above;
        if (err > scale)
            continue;
        if (err == scale || below == above)
            return NULL; /* on an edge, or two equally near */
        if (above < below)
            k++;
        if (k >> 64)
            return NULL;
        return fixed_digits((uint64_t)k, f, end);
    }
    return NULL;
}
#else /* no 128-bit integers (a 32-bit machine): Python's own function */
static char *float_repr(double x, char *end)
{
    return NULL;
}
#endif

/* repr(v) of a float: float_repr where it can, else what float.__repr__ calls. */
static int out_float(Out *o, double v)
{
    char fast[48], *end = fast + sizeof fast, *p = float_repr(fabs(v), end);
    if (v == 0.0 && !signbit(v))
        return out_put(o, "0.0", 3);
    if (p) {
        if (v < 0)
            *--p = '-';
        return out_put(o, p, end - p);
    }
    gil_take(o);
    char *s = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (!s)
        return -1;
    int r = out_put(o, s, (Py_ssize_t)strlen(s));
    PyMem_Free(s);
    if (r == 0)
        gil_give(o);
    return r;
}

static inline int item_put(Out *o, Item *it, Py_ssize_t i)
{
    if (it->has_missing && ((const char *)it->missing.buf)[i])
        return out_put(o, PyBytes_AS_STRING(it->absent), PyBytes_GET_SIZE(it->absent));
    switch (it->kind) {
    case K_LIT:
        return out_short(o, it->pad, PyBytes_GET_SIZE(it->obj));
    case K_INT:
        return out_int(o, ((const int64_t *)it->col.buf)[i], it->width);
    case K_UINT:
        return out_u64(o, ((const uint64_t *)it->col.buf)[i], 0, 0);
    case K_FLOAT:
        return out_float(o, ((const double *)it->col.buf)[i]);
    case K_REL:
        return out_rel(o, ((const int64_t *)it->col.buf)[i], it->t0, it->width);
    case K_EPOCH: {
        int64_t ns = ((const int64_t *)it->col.buf)[i];
        uint64_t mag = ns < 0 ? 0 - (uint64_t)ns : (uint64_t)ns;
        char fast[40], *end = fast + sizeof fast, *p = epoch_repr(mag, end);
        if (p) {
            if (ns < 0)
                *--p = '-';
            return out_put(o, p, end - p);
        }
        /* Else the nearest double to ns / 10^9, as Python's int / int gives it: the exact
         * decimal read by the correctly rounded strtod, and Python's own repr of it.
         * (double)ns / 1e9 rounds twice and misses by one unit in the last place for about
         * a third of the times of a capture. */
        char exact[32];
        snprintf(exact, sizeof exact, "%s%llu.%09llu", ns < 0 ? "-" : "",
                 (unsigned long long)(mag / 1000000000u), (unsigned long long)(mag % 1000000000u));
        gil_take(o);
        double v = PyOS_string_to_double(exact, NULL, NULL);
        if (v == -1.0 && PyErr_Occurred())
            return -1;
        char *s = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (!s)
            return -1;
        int r = out_put(o, s, (Py_ssize_t)strlen(s));
        PyMem_Free(s);
        if (r == 0)
            gil_give(o);
        return r;
    }
    case K_STR: {
        int32_t code = ((const int32_t *)it->col.buf)[i];
        if (code < 0 || code >= PyTuple_GET_SIZE(it->obj)) {
            gil_take(o);
            PyErr_SetString(PyExc_IndexError, "string code out of range");
            return -1;
        }
        if (it->pad)
            return out_short(o, it->pad + it->offs[code], it->offs[code + 1] - it->offs[code]);
        PyObject *s = PyTuple_GET_ITEM(it->obj, code);
        if (!PyBytes_Check(s)) {
            gil_take(o);
            PyErr_SetString(PyExc_TypeError, "strings must be bytes");
            return -1;
        }
        return out_put(o, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s));
    }
    case K_PREVIEW: {
        int64_t off = ((const int64_t *)it->col.buf)[i], len = ((const int64_t *)it->col2.buf)[i];
        if (len <= 0)
            return 0;
        if (off < 0 || off > it->data.len || len > it->data.len - off) {
            gil_take(o);
            PyErr_SetString(PyExc_IndexError, "payload outside the buffer");
            return -1;
        }
        if (out_put(o, PyBytes_AS_STRING(it->prefix), PyBytes_GET_SIZE(it->prefix)) < 0)
            return -1;
        return out_preview(o, (const uint8_t *)it->data.buf + off, len, it->width);
    }
    case K_OPT: {
        PyObject *s = PyList_GET_ITEM(it->obj, i);
        if (s == Py_None)
            return 0;
        if (!PyBytes_Check(s)) {
            gil_take(o);
            PyErr_SetString(PyExc_TypeError, "optional text must be bytes or None");
            return -1;
        }
        if (out_put(o, PyBytes_AS_STRING(it->prefix), PyBytes_GET_SIZE(it->prefix)) < 0)
            return -1;
        return out_put(o, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s));
    }
    }
    return 0;
}

/* The parsed templates of format_rows and write_rows. */
typedef struct {
    Py_ssize_t nt;
    Item **items;
    Py_ssize_t *counts;
} Templates;

static void templates_release(Templates *T)
{
    if (T->items)
        for (Py_ssize_t t = 0; t < T->nt; t++)
            if (T->items[t]) {
                items_release(T->items[t], T->counts[t]);
                PyMem_Free(T->items[t]);
            }
    PyMem_Free(T->items);
    PyMem_Free(T->counts);
}

static int templates_parse(Templates *T, PyObject *templates, Py_ssize_t rows,
                           const Py_buffer *which)
{
    T->nt = PyList_GET_SIZE(templates);
    T->items = PyMem_Calloc((size_t)(T->nt ? T->nt : 1), sizeof(Item *));
    T->counts = PyMem_Calloc((size_t)(T->nt ? T->nt : 1), sizeof(Py_ssize_t));
    if (!T->items || !T->counts) {
        PyErr_NoMemory();
        return -1;
    }
    if (rows < 0 || which->len < rows) {
        PyErr_SetString(PyExc_ValueError, "template choice column shorter than the rows");
        return -1;
    }
    for (Py_ssize_t t = 0; t < T->nt; t++) {
        PyObject *tmpl = PyList_GET_ITEM(templates, t);
        if (!PyList_Check(tmpl)) {
            PyErr_SetString(PyExc_TypeError, "a template is a list of items");
            return -1;
        }
        Py_ssize_t k = PyList_GET_SIZE(tmpl);
        T->items[t] = PyMem_Calloc((size_t)(k ? k : 1), sizeof(Item));
        if (!T->items[t]) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t j = 0; j < k; j++) {
            T->counts[t] = j + 1; /* released on error too: item_parse marks what it holds */
            if (item_parse(PyList_GET_ITEM(tmpl, j), &T->items[t][j], rows) < 0)
                return -1;
        }
    }
    return 0;
}

/* Rows a to b - 1, each with its template and a newline. */
static int put_rows(Out *o, const Templates *T, const int8_t *w, Py_ssize_t a, Py_ssize_t b)
{
    o->rows = b - a;
    for (Py_ssize_t i = a; i < b; i++) {
        o->done = i - a;
        if (w[i] < 0 || w[i] >= T->nt) {
            gil_take(o);
            PyErr_SetString(PyExc_IndexError, "template choice out of range");
            return -1;
        }
        Item *tmpl = T->items[w[i]];
        for (Py_ssize_t j = 0; j < T->counts[w[i]]; j++)
            if (item_put(o, &tmpl[j], i) < 0)
                return -1;
        if (out_put(o, "\n", 1) < 0)
            return -1;
    }
    return 0;
}

PyDoc_STRVAR(format_rows_doc,
"format_rows(rows, which, templates) -> bytes\n\n"
"Row i is written with templates[which[i]] (which: int8 column), each row followed by a\n"
"newline. A template is a list of items (see the K_* constants).");

static PyObject *format_rows(PyObject *self, PyObject *args)
{
    Py_ssize_t rows;
    Py_buffer which;
    PyObject *templates;
    if (!PyArg_ParseTuple(args, "ny*O!", &rows, &which, &PyList_Type, &templates))
        return NULL;
    Templates T = {0};
    Out o = {0};
    PyObject *result = NULL;
    if (templates_parse(&T, templates, rows, &which) < 0
        || put_rows(&o, &T, which.buf, 0, rows) < 0)
        goto done;
    if (!o.bytes)
        result = PyBytes_FromStringAndSize("", 0);
    else if (_PyBytes_Resize(&o.bytes, o.n) == 0)
        result = o.bytes;
    o.bytes = NULL; /* handed over, or freed by _PyBytes_Resize */
done:
    templates_release(&T);
    Py_XDECREF(o.bytes);
    PyBuffer_Release(&which);
    return result;
}

/* All of buf to fd (a pipe takes a part at a time; a signal may cut a write short).
 * Returns 0, or an errno. */
static int write_all(int fd, const char *buf, Py_ssize_t n)
{
    while (n > 0) {
        ssize_t k = write(fd, buf, (size_t)n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        buf += k;
        n -= k;
    }
    return 0;
}

PyDoc_STRVAR(write_rows_doc,
"write_rows(fd, rows, which, templates, piece) -> None\n\n"
"format_rows, written to the file descriptor fd `piece` rows at a time, through one buffer\n"
"reused: the text of a million rows never exists at once, and the GIL is let go for the\n"
"whole of it. A failed write raises OSError (BrokenPipeError when the reader left).");

static PyObject *write_rows(PyObject *self, PyObject *args)
{
    int fd;
    Py_ssize_t rows, piece;
    Py_buffer which;
    PyObject *templates;
    if (!PyArg_ParseTuple(args, "iny*O!n", &fd, &rows, &which, &PyList_Type, &templates,
                          &piece))
        return NULL;
    Templates T = {0};
    Out o = {0};
    PyObject *result = NULL;
    int err = 0, r = 0;
    if (piece < 1) {
        PyErr_SetString(PyExc_ValueError, "piece: at least one row");
        goto done;
    }
    if (templates_parse(&T, templates, rows, &which) < 0)
        goto done;
    o.raw = 1;
    gil_give(&o);
    for (Py_ssize_t a = 0; a < rows && !err && r == 0; a += piece) {
        r = put_rows(&o, &T, which.buf, a, a + (rows - a < piece ? rows - a : piece));
        if (r == 0)
            err = write_all(fd, o.p, o.n);
        o.n = 0;
    }
    gil_take(&o);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else if (r == 0)
        result = Py_NewRef(Py_None);
done:
    templates_release(&T);
    PyMem_RawFree(o.raw ? o.p : NULL);
    PyBuffer_Release(&which);
    return result;
}

PyDoc_STRVAR(factorize_doc,
"factorize(keys, codes) -> list[int]\n\n"
"The distinct values of keys (an int64 column) in the order they first appear; codes (a\n"
"writable int32 column as long) gets each row's index into that list.");

/* Where a key goes in a table of mask + 1 slots: every bit of the key moves the slot (keys
 * such as op << 48 | type << 32 | flags differ in their high bits). */
static inline size_t slot_of(int64_t key, size_t mask)
{
    uint64_t x = (uint64_t)key;
    x ^= x >> 32;
    x *= 0x9E3779B97F4A7C15u;
    x ^= x >> 29;
    return (size_t)x & mask;
}

/* A dictionary encoding by hashing: one pass, where numpy's unique sorts (7 ms for a batch
 * of 33k rows, twice per batch on decode's paths, for the handful of distinct values a
 * column of op, type and flags holds). */
static PyObject *factorize(PyObject *self, PyObject *args)
{
    Py_buffer keys, codes;
    if (!PyArg_ParseTuple(args, "y*w*", &keys, &codes))
        return NULL;
    Py_ssize_t n = keys.len / 8;
    PyObject *unique = NULL;
    int64_t *slot_key = NULL;
    int32_t *slot_code = NULL;
    size_t size = 64, used = 0;
    if (keys.len % 8 || codes.len < n * 4) {
        PyErr_SetString(PyExc_ValueError, "codes must hold an int32 for each int64 key");
        goto done;
    }
    unique = PyList_New(0);
    slot_key = PyMem_Malloc(size * sizeof *slot_key);
    slot_code = PyMem_Malloc(size * sizeof *slot_code);
    if (!unique || !slot_key || !slot_code) {
        if (unique)
            PyErr_NoMemory();
        goto fail;
    }
    memset(slot_code, 0xff, size * sizeof *slot_code); /* -1: empty */
    const int64_t *k = keys.buf;
    int32_t *out = codes.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (2 * (used + 1) > size) { /* keep the table at most half full */
            size_t bigger = 2 * size;
            int64_t *nk = PyMem_Malloc(bigger * sizeof *nk);
            int32_t *nc = PyMem_Malloc(bigger * sizeof *nc);
            if (!nk || !nc) {
                PyMem_Free(nk);
                PyMem_Free(nc);
                PyErr_NoMemory();
                goto fail;
            }
            memset(nc, 0xff, bigger * sizeof *nc);
            for (size_t j = 0; j < size; j++) {
                if (slot_code[j] < 0)
                    continue;
                size_t h = slot_of(slot_key[j], bigger - 1);
                while (nc[h] >= 0)
                    h = (h + 1) & (bigger - 1);
                nk[h] = slot_key[j];
                nc[h] = slot_code[j];
            }
            PyMem_Free(slot_key);
            PyMem_Free(slot_code);
            slot_key = nk;
            slot_code = nc;
            size = bigger;
        }
        size_t h = slot_of(k[i], size - 1);
        while (slot_code[h] >= 0 && slot_key[h] != k[i])
            h = (h + 1) & (size - 1);
        if (slot_code[h] < 0) {
            if (used > INT32_MAX) {
                PyErr_SetString(PyExc_OverflowError, "too many distinct keys");
                goto fail;
            }
            PyObject *v = PyLong_FromLongLong(k[i]);
            if (!v || PyList_Append(unique, v) < 0) {
                Py_XDECREF(v);
                goto fail;
            }
            Py_DECREF(v);
            slot_key[h] = k[i];
            slot_code[h] = (int32_t)used++;
        }
        out[i] = slot_code[h];
    }
    goto done;
fail:
    Py_CLEAR(unique);
done:
    PyMem_Free(slot_key);
    PyMem_Free(slot_code);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&codes);
    return unique;
}

/* -- format_table: decode --table, tabulate's "simple" format without a string per cell --
 *
 * decode --table was tabulate(rows, headers, disable_numparse=True) of a Python row per
 * frame: 45 CPU s on a million frames. What tabulate makes of such a call is simple enough
 * to write here (tests/test_decode_table.py holds the two equal): with number parsing off
 * every column is text, so every cell and header is left-aligned, padded with spaces to its
 * column's width, which is the longest of its cells and of its header plus two (tabulate's
 * MIN_PADDING), counted in code points (len: tabulate measures display width only with
 * wcwidth installed). Cells are separated by two spaces, a line of dashes of each column's
 * width follows the headers, and every line loses its trailing spaces (tabulate rstrips
 * rows). tabulate also strips every cell: cells here must neither start nor end with white
 * space (decode's never do). */

typedef struct {
    Item *items;
    Py_ssize_t n;
} Cell;

/* code points of n bytes of UTF-8: the bytes that do not continue a character */
static Py_ssize_t utf8_len(const char *s, Py_ssize_t n)
{
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        k += ((unsigned char)s[i] & 0xC0) != 0x80;
    return k;
}

static void cells_release(Cell *cells, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        items_release(cells[i].items, cells[i].n);
        PyMem_Free(cells[i].items);
    }
}

/* templates[t][c], a list of items, into cells[t * ncols + c]; what was parsed before an
 * error is released by cells_release too (see format_rows) */
static int cells_parse(PyObject *templates, Py_ssize_t ncols, Py_ssize_t rows, Cell *cells)
{
    for (Py_ssize_t t = 0; t < PyList_GET_SIZE(templates); t++) {
        PyObject *tmpl = PyList_GET_ITEM(templates, t);
        if (!PyList_Check(tmpl) || PyList_GET_SIZE(tmpl) != ncols) {
            PyErr_SetString(PyExc_ValueError, "a table template is a list of a cell per header");
            return -1;
        }
        for (Py_ssize_t c = 0; c < ncols; c++) {
            PyObject *items = PyList_GET_ITEM(tmpl, c);
            Cell *cell = &cells[t * ncols + c];
            if (!PyList_Check(items)) {
                PyErr_SetString(PyExc_TypeError, "a cell is a list of items");
                return -1;
            }
            Py_ssize_t k = PyList_GET_SIZE(items);
            if (!(cell->items = PyMem_Calloc((size_t)(k ? k : 1), sizeof(Item)))) {
                PyErr_NoMemory();
                return -1;
            }
            for (Py_ssize_t j = 0; j < k; j++) {
                cell->n = j + 1;
                if (item_parse(PyList_GET_ITEM(items, j), &cell->items[j], rows) < 0)
                    return -1;
            }
        }
    }
    return 0;
}

/* Every cell's text, end to end into text (cell c of row i ends at end[i * ncols + c]),
 * widening width[c] to the longest. */
static int cells_text(Out *text, Py_ssize_t rows, const int8_t *which, Py_ssize_t nt,
                      Py_ssize_t ncols, Cell *cells, Py_ssize_t *end, Py_ssize_t *width)
{
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (which[i] < 0 || which[i] >= nt) {
            PyErr_SetString(PyExc_IndexError, "template choice out of range");
            return -1;
        }
        Cell *tmpl = &cells[which[i] * ncols];
        for (Py_ssize_t c = 0; c < ncols; c++) {
            Py_ssize_t start = text->n;
            for (Py_ssize_t j = 0; j < tmpl[c].n; j++)
                if (item_put(text, &tmpl[c].items[j], i) < 0)
                    return -1;
            Py_ssize_t w = utf8_len(text->p + start, text->n - start);
            if (w > width[c])
                width[c] = w;
            end[i * ncols + c] = text->n;
        }
    }
    return 0;
}

/* One line: each cell left-aligned in its column's width, two spaces between columns, no
 * trailing spaces, a newline; returns where the next line starts. */
static char *table_line(char *p, const char *const *cell, const Py_ssize_t *bytes,
                        const Py_ssize_t *shown, const Py_ssize_t *width, Py_ssize_t ncols)
{
    char *start = p;
    for (Py_ssize_t c = 0; c < ncols; c++) {
        memcpy(p, cell[c], (size_t)bytes[c]);
        p += bytes[c];
        Py_ssize_t pad = width[c] - shown[c] + (c + 1 < ncols ? 2 : 0);
        memset(p, ' ', (size_t)pad);
        p += pad;
    }
    while (p > start && p[-1] == ' ')
        p--;
    *p++ = '\n';
    return p;
}

/* The header line, the dashes, then a line per row, into one bytes object. */
static PyObject *table_lines(PyObject *headers, Py_ssize_t rows, Py_ssize_t ncols,
                             const Out *text, const Py_ssize_t *end, const Py_ssize_t *width)
{
    const char **cell = PyMem_Calloc((size_t)ncols + 1, sizeof *cell);
    Py_ssize_t *bytes = PyMem_Calloc((size_t)ncols + 1, sizeof *bytes);
    Py_ssize_t *shown = PyMem_Calloc((size_t)ncols + 1, sizeof *shown);
    char *dashes = NULL;
    PyObject *out = NULL;
    /* a line takes at most its cells' bytes plus each column's width and separator */
    Py_ssize_t line = 1, head = 0, size;
    for (Py_ssize_t c = 0; c < ncols; c++)
        line += width[c] + 2;
    if (!cell || !bytes || !shown)
        goto nomem;
    for (Py_ssize_t c = 0; c < ncols; c++) {
        if (!(cell[c] = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(headers, c), &bytes[c])))
            goto done;
        shown[c] = PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(headers, c));
        head += bytes[c];
    }
    if (rows > (PY_SSIZE_T_MAX - head - text->n) / line - 2)
        goto nomem;
    size = head + text->n + (rows + 2) * line;
    if (!(dashes = PyMem_Malloc((size_t)line)) || !(out = PyBytes_FromStringAndSize(NULL, size)))
        goto nomem;
    memset(dashes, '-', (size_t)line);
    char *p = table_line(PyBytes_AS_STRING(out), cell, bytes, shown, width, ncols);
    for (Py_ssize_t c = 0; c < ncols; c++) {
        cell[c] = dashes;
        bytes[c] = shown[c] = width[c];
    }
    p = table_line(p, cell, bytes, shown, width, ncols);
    for (Py_ssize_t i = 0, from = 0; i < rows; i++) {
        for (Py_ssize_t c = 0; c < ncols; c++) {
            cell[c] = text->p + from;
            bytes[c] = end[i * ncols + c] - from;
            shown[c] = utf8_len(cell[c], bytes[c]);
            from = end[i * ncols + c];
        }
        p = table_line(p, cell, bytes, shown, width, ncols);
    }
    if (_PyBytes_Resize(&out, p - PyBytes_AS_STRING(out)) < 0)
        out = NULL; /* freed by _PyBytes_Resize */
    goto done;
nomem:
    Py_CLEAR(out);
    PyErr_NoMemory();
done:
    PyMem_Free(cell);
    PyMem_Free(bytes);
    PyMem_Free(shown);
    PyMem_Free(dashes);
    return out;
}

PyDoc_STRVAR(format_table_doc,
"format_table(rows, which, templates, headers) -> bytes\n\n"
"tabulate(rows, headers=headers, disable_numparse=True) of the rows, and a newline: row i's\n"
"cells are templates[which[i]] (which: int8 column), a list of a cell per header, each a\n"
"list of items (see format_rows). Cells must not start or end with white space.");

static PyObject *format_table(PyObject *self, PyObject *args)
{
    Py_ssize_t rows;
    Py_buffer which;
    PyObject *templates, *headers;
    if (!PyArg_ParseTuple(args, "ny*O!O!", &rows, &which, &PyList_Type, &templates,
                          &PyTuple_Type, &headers))
        return NULL;
    Py_ssize_t ncols = PyTuple_GET_SIZE(headers), ncells = PyList_GET_SIZE(templates) * ncols;
    Cell *cells = PyMem_Calloc((size_t)(ncells ? ncells : 1), sizeof *cells);
    Py_ssize_t *width = PyMem_Calloc((size_t)ncols + 1, sizeof *width), *end = NULL;
    Out text = {0};
    PyObject *result = NULL;
    if (!cells || !width) {
        PyErr_NoMemory();
        goto done;
    }
    if (rows < 0 || which.len < rows) {
        PyErr_SetString(PyExc_ValueError, "template choice column shorter than the rows");
        goto done;
    }
    if ((ncols && rows > PY_SSIZE_T_MAX / 8 / ncols)
        || !(end = PyMem_Malloc((size_t)(rows * ncols + 1) * sizeof *end))) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t c = 0; c < ncols; c++) {
        PyObject *h = PyTuple_GET_ITEM(headers, c);
        if (!PyUnicode_Check(h)) {
            PyErr_SetString(PyExc_TypeError, "headers must be str");
            goto done;
        }
        width[c] = PyUnicode_GET_LENGTH(h) + 2; /* tabulate's MIN_PADDING */
    }
    if (out_reserve(&text, 1) < 0 /* text.p is a buffer even where every cell is empty */
        || cells_parse(templates, ncols, rows, cells) < 0
        || cells_text(&text, rows, which.buf, PyList_GET_SIZE(templates), ncols, cells, end,
                      width) < 0)
        goto done;
    result = table_lines(headers, rows, ncols, &text, end, width);
done:
    if (cells)
        cells_release(cells, ncells);
    PyMem_Free(cells);
    PyMem_Free(width);
    PyMem_Free(end);
    Py_XDECREF(text.bytes);
    PyBuffer_Release(&which);
    return result;
}

static PyMethodDef methods[] = {
    {"format_rows", format_rows, METH_VARARGS, format_rows_doc},
    {"write_rows", write_rows, METH_VARARGS, write_rows_doc},
    {"factorize", factorize, METH_VARARGS, factorize_doc},
    {"format_table", format_table, METH_VARARGS, format_table_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vsockmon.decode._render",
    "Rows of text from columns, compiled (see render.py).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__render(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    static const struct { const char *name; int value; } kinds[] = {
        {"K_LIT", K_LIT}, {"K_INT", K_INT}, {"K_UINT", K_UINT}, {"K_REL", K_REL},
        {"K_EPOCH", K_EPOCH}, {"K_STR", K_STR}, {"K_PREVIEW", K_PREVIEW}, {"K_OPT", K_OPT},
        {"K_FLOAT", K_FLOAT},
    };
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (PyModule_AddIntConstant(m, kinds[i].name, kinds[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    return m;
}

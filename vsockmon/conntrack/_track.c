/* Connection tracking's per-packet work, compiled: the key map and the per-row pass.
 *
 * The numpy tracker this replaces sorted every batch by connection and ran ~150 vector
 * operations over it (segmented sums, maxima, shifts); on a million packets that was about
 * 0.7 CPU s, most of `conns --json`. Here each row is visited once, in frame order, and the
 * rules are the sequential ones the module docstring of tracker.py states. The state stays in
 * the StreamTable's numpy columns (this file only reads and writes them), so the spill,
 * the results and every reader above are unchanged.
 *
 * KeyMap replaces the tracker's dict of connection keys (a tuple of three ints per
 * connection, ~200 bytes; here 40 bytes in one open-addressing array). Keys are
 * (type, lower end, higher end) with ends ordered as (cid, port) pairs: the order the packed
 * `cid << 32 | port` form gives when CIDs fit 32 bits, and the same order when they do not.
 *
 * Every index is checked: rows against the header buffer, slots against the table's
 * capacity, buffers against the sizes their shapes need. No numpy: arrays come in through
 * the buffer protocol.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Wire values the rules need (tests hold them equal to vsockmon.wire.protocol's enums). */
enum { OP_REQUEST = 1, OP_RESPONSE = 2, OP_RST = 3, OP_SHUTDOWN = 4, OP_RW = 5,
       OP_CREDIT_UPDATE = 6, OP_CREDIT_REQUEST = 7 };
enum { TYPE_SEQPACKET = 2 };
/* What assign writes for a row that starts a stream: which end of its key the source is. */
enum { START_LOWER = 1, START_HIGHER = 2 };
enum { SHUT_RCV = 1, SHUT_SEND = 2, SEQ_EOM = 1, SEQ_EOR = 2 };
enum { ANOM_PAYLOAD_LEN = 4 };
/* Violation kinds in model.VIOLATIONS order. */
enum { V_BEYOND = 0, V_AFTER_SHUTDOWN = 1, V_BEFORE_RESPONSE = 2, V_TAP_LENGTH = 3, NVIOL = 4 };
#define NONE INT64_MAX
#define HALF ((int64_t)1 << 31)
#define U32_MASK (((int64_t)1 << 32) - 1)

/* int64 arithmetic that wraps like numpy's (corrupt counters must not be undefined). */
static inline int64_t wadd(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }
static inline int64_t wsub(int64_t a, int64_t b) { return (int64_t)((uint64_t)a - (uint64_t)b); }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- the virtio header columns ------------------------------------------------------------ */

/* The fields read, in the order of the layout tuple Python passes (their offsets). */
enum { F_SRC_CID, F_DST_CID, F_SRC_PORT, F_DST_PORT, F_LEN, F_TYPE, F_OP, F_FLAGS, F_BUF,
       F_FWD, NFIELDS };
static const char *const FIELD_NAMES[NFIELDS] = {
    "src_cid", "dst_cid", "src_port", "dst_port", "len", "type", "op", "flags", "buf_alloc",
    "fwd_cnt"};
static const int FIELD_SIZES[NFIELDS] = {8, 8, 4, 4, 4, 2, 2, 4, 4, 4};

typedef struct {
    Py_buffer buf;      /* the batch's structured header array (every frame's row) */
    Py_buffer rows;     /* int64 rows of it that carry a header */
    Py_ssize_t itemsize, n, m;
    Py_ssize_t off[NFIELDS];
    const int64_t *row;
} Headers;

static inline uint64_t rd_le(const uint8_t *p, int size)
{
    uint64_t v = 0;
    for (int i = size - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static inline uint64_t field(const Headers *h, Py_ssize_t i, int f)
{
    return rd_le((const uint8_t *)h->buf.buf + h->row[i] * h->itemsize + h->off[f],
                 FIELD_SIZES[f]);
}

static void headers_release(Headers *h)
{
    PyBuffer_Release(&h->buf);
    PyBuffer_Release(&h->rows);
}

/* Parse (buffer, layout, rows): layout = (itemsize, offset of each field). */
static int headers_parse(Headers *h, PyObject *buf, PyObject *layout, PyObject *rows)
{
    memset(h, 0, sizeof *h);
    if (!PyTuple_Check(layout) || PyTuple_GET_SIZE(layout) != NFIELDS + 1) {
        PyErr_SetString(PyExc_ValueError, "layout: (itemsize, one offset per field)");
        return -1;
    }
    h->itemsize = PyLong_AsSsize_t(PyTuple_GET_ITEM(layout, 0));
    for (int f = 0; f < NFIELDS; f++)
        h->off[f] = PyLong_AsSsize_t(PyTuple_GET_ITEM(layout, f + 1));
    if (PyErr_Occurred())
        return -1;
    for (int f = 0; f < NFIELDS; f++)
        if (h->off[f] < 0 || h->off[f] + FIELD_SIZES[f] > h->itemsize) {
            PyErr_SetString(PyExc_ValueError, "layout: a field lies outside the header");
            return -1;
        }
    if (PyObject_GetBuffer(buf, &h->buf, PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(rows, &h->rows, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&h->buf);
        return -1;
    }
    h->n = h->itemsize ? h->buf.len / h->itemsize : 0;
    h->m = h->rows.len / (Py_ssize_t)sizeof(int64_t);
    h->row = h->rows.buf;
    if (h->rows.len % (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "rows: not int64");
        goto bad;
    }
    for (Py_ssize_t i = 0; i < h->m; i++)
        if (h->row[i] < 0 || h->row[i] >= h->n) {
            PyErr_SetString(PyExc_IndexError, "rows: a row outside the headers");
            goto bad;
        }
    return 0;
bad:
    headers_release(h);
    return -1;
}

/* A writable (or readable) buffer of exactly `count` items of `size` bytes. */
static int get_sized(PyObject *obj, Py_buffer *b, Py_ssize_t count, Py_ssize_t size,
                     int writable, const char *what)
{
    if (PyObject_GetBuffer(obj, b, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (b->len != count * size) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", what, b->len,
                     count * size);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* ---- the key map -------------------------------------------------------------------------- */

typedef struct {
    uint64_t lo_cid, hi_cid;
    uint32_t lo_port, hi_port;
    uint16_t type;
} Key;

typedef struct {
    uint64_t lo_cid, hi_cid;
    uint32_t lo_port, hi_port;
    int64_t value;
    uint32_t hash;
    uint16_t type;
    uint8_t used;
} Entry;

typedef struct {
    PyObject_HEAD
    Entry *e;
    size_t cap, n;  /* cap: a power of two; at most half full */
} KeyMap;

#define MIN_CAP 1024
#define PENDING (-2)  /* a key entered with no stream yet: its next row starts one */

static inline uint64_t mix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static inline uint32_t key_hash(const Key *k)
{
    uint64_t h = mix(k->lo_cid ^ ((uint64_t)k->type << 48));
    h = mix(h ^ k->hi_cid);
    return (uint32_t)mix(h ^ ((uint64_t)k->lo_port << 32 | k->hi_port));
}

/* The connection key of two ends, and whether the first end is the lower one. */
static inline int make_key(Key *k, uint16_t type, uint64_t a_cid, uint32_t a_port,
                           uint64_t b_cid, uint32_t b_port)
{
    int a_lo = a_cid < b_cid || (a_cid == b_cid && a_port <= b_port);
    k->type = type;
    k->lo_cid = a_lo ? a_cid : b_cid;
    k->lo_port = a_lo ? a_port : b_port;
    k->hi_cid = a_lo ? b_cid : a_cid;
    k->hi_port = a_lo ? b_port : a_port;
    return a_lo;
}

/* The key of header row `i`; returns whether its source is the key's lower end. */
static inline int header_key(Key *k, const Headers *h, Py_ssize_t i)
{
    return make_key(k, (uint16_t)field(h, i, F_TYPE), field(h, i, F_SRC_CID),
             (uint32_t)field(h, i, F_SRC_PORT), field(h, i, F_DST_CID),
             (uint32_t)field(h, i, F_DST_PORT));
}

/* The slot holding `k`, or the empty slot where it would go. */
static size_t km_slot(const KeyMap *m, const Key *k, uint32_t hash)
{
    size_t mask = m->cap - 1, i = hash & mask;
    for (;; i = (i + 1) & mask) {
        const Entry *e = &m->e[i];
        if (!e->used)
            return i;
        if (e->hash == hash && e->lo_cid == k->lo_cid && e->hi_cid == k->hi_cid
            && e->lo_port == k->lo_port && e->hi_port == k->hi_port && e->type == k->type)
            return i;
    }
}

static int km_resize(KeyMap *m, size_t cap)
{
    Entry *e = PyMem_Calloc(cap, sizeof(Entry));
    if (!e) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->e[i].used)
            continue;
        size_t j = m->e[i].hash & (cap - 1);
        while (e[j].used)
            j = (j + 1) & (cap - 1);
        e[j] = m->e[i];
    }
    PyMem_Free(m->e);
    m->e = e;
    m->cap = cap;
    return 0;
}

/* Enter `k` (value PENDING) at `e`, the empty slot km_slot found for it; returns its entry
 * (moved if the map had to grow), NULL only when out of memory. */
static Entry *km_insert(KeyMap *m, Entry *e, const Key *k, uint32_t hash)
{
    if ((m->n + 1) * 2 > m->cap) {
        if (km_resize(m, m->cap * 2) < 0)
            return NULL;
        e = &m->e[km_slot(m, k, hash)];
    }
    e->lo_cid = k->lo_cid;
    e->hi_cid = k->hi_cid;
    e->lo_port = k->lo_port;
    e->hi_port = k->hi_port;
    e->type = k->type;
    e->hash = hash;
    e->used = 1;
    e->value = PENDING;
    m->n++;
    return e;
}

/* The entry of `k`, made (value PENDING) if absent; NULL only when out of memory. */
static Entry *km_get(KeyMap *m, const Key *k)
{
    uint32_t hash = key_hash(k);
    Entry *e = &m->e[km_slot(m, k, hash)];
    return e->used ? e : km_insert(m, e, k, hash);
}

/* Remove slot i, shifting later entries of its probe run back (no tombstones). */
static void km_remove(KeyMap *m, size_t i)
{
    size_t mask = m->cap - 1, j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!m->e[j].used)
            break;
        size_t home = m->e[j].hash & mask;
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->e[i] = m->e[j];
            i = j;
        }
    }
    m->e[i].used = 0;
    m->n--;
}

/* After removals: give memory back once the map is mostly empty. */
static int km_shrink(KeyMap *m)
{
    if (m->cap <= MIN_CAP || m->n * 8 >= m->cap)
        return 0;
    size_t cap = MIN_CAP;
    while (cap < m->n * 4)
        cap *= 2;
    return km_resize(m, cap);
}

static PyObject *KeyMap_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    KeyMap *m = (KeyMap *)type->tp_alloc(type, 0);
    if (!m)
        return NULL;
    m->cap = MIN_CAP;
    m->e = PyMem_Calloc(m->cap, sizeof(Entry));
    if (!m->e) {
        Py_DECREF(m);
        return PyErr_NoMemory();
    }
    return (PyObject *)m;
}

static void KeyMap_dealloc(KeyMap *m)
{
    PyMem_Free(m->e);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t KeyMap_len(KeyMap *m) { return (Py_ssize_t)m->n; }

/* ---- keys a spill may hold ------------------------------------------------------------- */

/* spill.key_hash's multipliers: the spill indexes its chunks by that hash of the packed key. */
static const uint64_t SPILL_MIX[3] = {0x9E3779B97F4A7C15ULL, 0xC2B2AE3D27D4EB4FULL,
                                      0x165667B19E3779F9ULL};
#define CID_FITS 0xFFFFFFFFULL

/* The spill's hash of `k` (spill.key_hash of type, lower and higher end as cid << 32 | port);
 * returns 0 (no hash) when a CID does not fit 32 bits: such keys are never spilled. */
static inline int spill_hash(const Key *k, uint64_t *h)
{
    if (k->lo_cid > CID_FITS || k->hi_cid > CID_FITS)
        return 0;
    uint64_t lo = k->lo_cid << 32 | k->lo_port, hi = k->hi_cid << 32 | k->hi_port;
    *h = ((uint64_t)k->type * SPILL_MIX[0]) ^ (lo * SPILL_MIX[1]) ^ ((hi * SPILL_MIX[2]) >> 7);
    return 1;
}

/* The spill's chunk indexes: ascending u64 key hashes, one buffer per chunk. */
typedef struct {
    Py_buffer *b;
    Py_ssize_t n;
} SpillKeys;

static void spill_release(SpillKeys *s)
{
    for (Py_ssize_t c = 0; c < s->n; c++)
        PyBuffer_Release(&s->b[c]);
    PyMem_Free(s->b);
}

static int spill_parse(SpillKeys *s, PyObject *chunks)
{
    Py_ssize_t n = PyTuple_GET_SIZE(chunks);
    s->n = 0;
    s->b = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (!s->b) {
        PyErr_NoMemory();
        return -1;
    }
    for (; s->n < n; s->n++) {
        Py_buffer *b = &s->b[s->n];
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(chunks, s->n), b, PyBUF_SIMPLE) < 0)
            goto bad;
        if (b->len % (Py_ssize_t)sizeof(uint64_t)) {
            PyBuffer_Release(b);
            PyErr_SetString(PyExc_ValueError, "spilled: not u64");
            goto bad;
        }
    }
    return 0;
bad:
    spill_release(s);
    return -1;
}

/* Whether some chunk holds the spill hash of `k` (a row of a spilled stream, or a rare
 * collision: the caller confirms on the key itself). */
static int maybe_spilled(const SpillKeys *s, const Key *k)
{
    uint64_t h;
    if (!s->n || !spill_hash(k, &h))
        return 0;
    for (Py_ssize_t c = 0; c < s->n; c++) {
        const uint64_t *a = s->b[c].buf;
        Py_ssize_t lo = 0, hi = s->b[c].len / (Py_ssize_t)sizeof(uint64_t);
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (a[mid] < h)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo < s->b[c].len / (Py_ssize_t)sizeof(uint64_t) && a[lo] == h)
            return 1;
    }
    return 0;
}

PyDoc_STRVAR(put_doc,
"put(headers, layout, rows, streams)\n\n"
"Give the keys of `rows` the int64 `streams` (one per row): streams taken back from a\n"
"spill. A negative one enters an absent key with no stream (the spill holds none for it:\n"
"assign then starts one at the key's row).");

static PyObject *KeyMap_put(KeyMap *m, PyObject *args)
{
    PyObject *buf, *layout, *rows, *vals, *result = NULL;
    Headers h;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OO!OO", &buf, &PyTuple_Type, &layout, &rows, &vals)
        || headers_parse(&h, buf, layout, rows) < 0)
        return NULL;
    if (get_sized(vals, &v, h.m, sizeof(int64_t), 0, "streams") < 0)
        goto done;
    for (Py_ssize_t i = 0; i < h.m; i++) {
        int64_t s = ((const int64_t *)v.buf)[i];
        Key key;
        header_key(&key, &h, i);
        Entry *e = km_get(m, &key);
        if (!e)
            goto release;
        if (s >= 0)
            e->value = s;
    }
    result = Py_NewRef(Py_None);
release:
    PyBuffer_Release(&v);
done:
    headers_release(&h);
    return result;
}

PyDoc_STRVAR(assign_doc,
"assign(headers, layout, rows, start, next, streams_out, starts_out, spilled)\n"
"    -> (stop, next)\n\n"
"Give each of `rows`, in order from position `start`, its stream: a REQUEST, or a key with\n"
"none, starts stream `next`, `next + 1`...; any other row joins its key's stream. Writes\n"
"each row's stream to `streams_out` (int64) and to `starts_out` (u8), both of len(rows),\n"
"0 when the row joins a stream, else START_LOWER when it starts one from the lower end\n"
"of its key (the (cid, port) order keys use; a looped frame's source counts as lower),\n"
"START_HIGHER from the higher: the one place that order is decided. Stops before a row that is not a REQUEST whose key is absent\n"
"but whose spill hash one of the ascending u64 arrays `spilled` holds (the spill's chunk\n"
"indexes: a late frame joins its spilled stream): the caller takes the stream back, puts\n"
"its key and calls again from there. Returns where it stopped (len(rows): at the end) and\n"
"the next stream number.");

static PyObject *KeyMap_assign(KeyMap *m, PyObject *args)
{
    PyObject *buf, *layout, *rows, *sids_obj, *starts_obj, *spilled, *result = NULL;
    Py_ssize_t start;
    long long next;
    Headers h;
    Py_buffer sids, starts;
    SpillKeys sk;
    if (!PyArg_ParseTuple(args, "OO!OnLOOO!", &buf, &PyTuple_Type, &layout, &rows, &start,
                          &next, &sids_obj, &starts_obj, &PyTuple_Type, &spilled)
        || headers_parse(&h, buf, layout, rows) < 0)
        return NULL;
    if (start < 0 || start > h.m) {
        PyErr_SetString(PyExc_IndexError, "start: outside the rows");
        goto done;
    }
    if (get_sized(sids_obj, &sids, h.m, sizeof(int64_t), 1, "streams_out") < 0)
        goto done;
    if (get_sized(starts_obj, &starts, h.m, 1, 1, "starts_out") < 0)
        goto release_sids;
    if (spill_parse(&sk, spilled) < 0)
        goto release_starts;
    int64_t *sid = sids.buf;
    uint8_t *started = starts.buf;
    Py_ssize_t i = start;
    for (; i < h.m; i++) {
        Key key;
        int src_lower = header_key(&key, &h, i);
        uint32_t hash = key_hash(&key);
        int request = field(&h, i, F_OP) == OP_REQUEST;
        Entry *e = &m->e[km_slot(m, &key, hash)];
        if (!e->used) {
            if (!request && maybe_spilled(&sk, &key))
                break;
            if (!(e = km_insert(m, e, &key, hash)))
                goto release;
        }
        started[i] = e->value < 0 || request ? (src_lower ? START_LOWER : START_HIGHER) : 0;
        if (started[i])
            e->value = next++;
        sid[i] = e->value;
    }
    result = Py_BuildValue("(nL)", i, next);
release:
    spill_release(&sk);
release_starts:
    PyBuffer_Release(&starts);
release_sids:
    PyBuffer_Release(&sids);
done:
    headers_release(&h);
    return result;
}

PyDoc_STRVAR(discard_doc,
"discard(types, cids, ports, streams)\n\n"
"Remove the keys of table rows (u16 types, (n, 2) u64 cids and u32 ports) whose entry\n"
"still holds that row's stream: a newer stream of the same key keeps it.");

static PyObject *KeyMap_discard(KeyMap *m, PyObject *args)
{
    PyObject *to, *co, *po, *so, *result = NULL;
    Py_buffer t, c, p, s;
    if (!PyArg_ParseTuple(args, "OOOO", &to, &co, &po, &so))
        return NULL;
    if (PyObject_GetBuffer(to, &t, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t n = t.len / 2;
    if (get_sized(co, &c, 2 * n, 8, 0, "cids") < 0)
        goto release_t;
    if (get_sized(po, &p, 2 * n, 4, 0, "ports") < 0)
        goto release_c;
    if (get_sized(so, &s, n, 8, 0, "streams") < 0)
        goto release_p;
    const uint16_t *type = t.buf;
    const uint64_t *cid = c.buf;
    const uint32_t *port = p.buf;
    const int64_t *sid = s.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        Key key;
        make_key(&key, type[i], cid[2 * i], port[2 * i], cid[2 * i + 1], port[2 * i + 1]);
        size_t j = km_slot(m, &key, key_hash(&key));
        if (m->e[j].used && m->e[j].value == sid[i])
            km_remove(m, j);
    }
    if (km_shrink(m) == 0)
        result = Py_NewRef(Py_None);
    PyBuffer_Release(&s);
release_p:
    PyBuffer_Release(&p);
release_c:
    PyBuffer_Release(&c);
release_t:
    PyBuffer_Release(&t);
    return result;
}

static int in_sorted(const int64_t *a, Py_ssize_t n, int64_t v)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (a[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && a[lo] == v;
}

PyDoc_STRVAR(drop_doc,
"drop(streams)\n\n"
"Remove every key whose stream is among the ascending int64 `streams` (forgotten ones).");

static PyObject *KeyMap_drop(KeyMap *m, PyObject *args)
{
    Py_buffer s;
    if (!PyArg_ParseTuple(args, "y*", &s))
        return NULL;
    const int64_t *gone = s.buf;
    Py_ssize_t n = s.len / (Py_ssize_t)sizeof(int64_t);
    for (size_t i = 0; i < m->cap;) {
        if (m->e[i].used && in_sorted(gone, n, m->e[i].value))
            km_remove(m, i);  /* a later entry may have moved into i: look again */
        else
            i++;
    }
    PyBuffer_Release(&s);
    if (km_shrink(m) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- the per-row pass --------------------------------------------------------------------- */

/* The StreamTable columns the pass reads and writes, in the order Python passes them. */
enum { C_CLIENT_IS_LOWER, C_START_SEEN, C_LAST_FRAME, C_LAST_TS, C_RESPONSE_FRAME, C_CLOSED,
       C_PACKETS, C_RW_PACKETS, C_TX_BYTES, C_EOM_PACKETS, C_EOR_PACKETS, C_CREDIT_UPDATES,
       C_CREDIT_REQUESTS, C_FIRST_RW_FRAME, C_LAST_RW_FRAME, C_SHUTDOWN_SEND_FRAME,
       C_CREDIT_KNOWN, C_FWD_RAW, C_FWD_UNW, C_FWD_MAX, C_BUF_ALLOC, C_OUTSTANDING_FLOOR,
       C_MAX_IN_FLIGHT, C_MIN_CREDIT, C_STALLED, C_STALL_TS, C_STALL_FRAME, C_STALLS,
       C_STALL_TOTAL, C_STALL_MAX, C_STALL_FIRST, C_STALL_LONGEST, C_VIOLATION_COUNT,
       C_VIOLATION_FIRST, C_VIOLATION_LAST, NCOLS };

typedef struct {
    const char *name;
    int itemsize, width;  /* width: values per stream */
} ColSpec;

static const ColSpec COLS[NCOLS] = {
    {"client_is_lower", 1, 1}, {"start_seen", 1, 1}, {"last_frame", 8, 1},
    {"last_ts", 8, 1}, {"response_frame", 8, 1}, {"closed", 1, 1}, {"packets", 8, 2},
    {"rw_packets", 8, 2}, {"tx_bytes", 8, 2}, {"eom_packets", 8, 2}, {"eor_packets", 8, 2},
    {"credit_updates", 8, 2}, {"credit_requests", 8, 2}, {"first_rw_frame", 8, 2},
    {"last_rw_frame", 8, 2}, {"shutdown_send_frame", 8, 2}, {"credit_known", 1, 2},
    {"fwd_raw", 8, 2}, {"fwd_unw", 8, 2}, {"fwd_max", 8, 2}, {"buf_alloc", 8, 2},
    {"outstanding_floor", 8, 2}, {"max_in_flight", 8, 2}, {"min_credit", 8, 2},
    {"stalled", 1, 2}, {"stall_ts", 8, 2}, {"stall_frame", 8, 2}, {"stalls", 8, 2},
    {"stall_total", 8, 2}, {"stall_max", 8, 2}, {"stall_first", 8, 2},
    {"stall_longest", 8, 2}, {"violation_count", 8, 2 * NVIOL},
    {"violation_first", 8, 2 * NVIOL}, {"violation_last", 8, 2 * NVIOL},
};

typedef struct {
    Py_buffer b[NCOLS];
    int held;
} Table;

#define I64(tab, c) ((int64_t *)(tab)->b[c].buf)
#define U8(tab, c) ((uint8_t *)(tab)->b[c].buf)

/* Release the first `held` buffers of a column set. */
static void columns_release(Py_buffer *b, int *held)
{
    for (int c = 0; c < *held; c++)
        PyBuffer_Release(&b[c]);
    *held = 0;
}

/* Take `cols`, a tuple of one writable array per `spec` entry (`rows` times its width items
 * of its size each), into `b`; on an error none stays held. `what` names the tuple and
 * `names` the module attribute that lists the entries, for the message. */
static int columns_parse(Py_buffer *b, int *held, PyObject *cols, const ColSpec *spec, int n,
                         Py_ssize_t rows, const char *what, const char *names)
{
    *held = 0;
    if (!PyTuple_Check(cols) || PyTuple_GET_SIZE(cols) != n) {
        PyErr_Format(PyExc_ValueError, "%s: one writable array per %s name", what, names);
        return -1;
    }
    for (int c = 0; c < n; c++) {
        if (get_sized(PyTuple_GET_ITEM(cols, c), &b[c], rows * spec[c].width, spec[c].itemsize,
                      1, spec[c].name) < 0) {
            columns_release(b, held);
            return -1;
        }
        (*held)++;
    }
    return 0;
}

/* Sender d's bytes in flight and its peer's buffer after a row (-1, -1: peer unknown);
 * updates the floor, the extremes and the stall runs of stream s. */
static void credit_after(Table *t, Py_ssize_t s, int d, int64_t frame, int64_t ts,
                         int64_t *in_flight, int64_t *limit)
{
    Py_ssize_t sd = 2 * s + d, sr = 2 * s + (1 - d);
    int64_t flight = -1, lim = -1;
    if (U8(t, C_CREDIT_KNOWN)[sr]) {
        int64_t c = wsub(I64(t, C_TX_BYTES)[sd], I64(t, C_FWD_MAX)[sr]);
        int64_t floor = min64(I64(t, C_OUTSTANDING_FLOOR)[sd], c);
        I64(t, C_OUTSTANDING_FLOOR)[sd] = floor;
        flight = wsub(c, floor);
        lim = I64(t, C_BUF_ALLOC)[sr];
        I64(t, C_MAX_IN_FLIGHT)[sd] = max64(I64(t, C_MAX_IN_FLIGHT)[sd], flight);
        I64(t, C_MIN_CREDIT)[sd] = min64(I64(t, C_MIN_CREDIT)[sd], wsub(lim, flight));
    }
    *in_flight = flight;
    *limit = lim;
    /* a stall: the peer's buffer is known and the bytes in flight fill it (model.no_credit) */
    uint8_t zero = lim >= 0 && flight >= lim;
    if (zero == U8(t, C_STALLED)[sd])
        return;
    U8(t, C_STALLED)[sd] = zero;
    if (zero) {
        I64(t, C_STALLS)[sd]++;
        I64(t, C_STALL_FIRST)[sd] = min64(I64(t, C_STALL_FIRST)[sd], frame);
        I64(t, C_STALL_TS)[sd] = ts;
        I64(t, C_STALL_FRAME)[sd] = frame;
        return;
    }
    int64_t dur = wsub(ts, I64(t, C_STALL_TS)[sd]);
    I64(t, C_STALL_TOTAL)[sd] = wadd(I64(t, C_STALL_TOTAL)[sd], dur);
    if (dur > I64(t, C_STALL_MAX)[sd]) {  /* strict: the earliest of equal longest stalls */
        I64(t, C_STALL_MAX)[sd] = dur;
        I64(t, C_STALL_LONGEST)[sd] = I64(t, C_STALL_FRAME)[sd];
    }
    I64(t, C_STALL_TS)[sd] = 0;
    I64(t, C_STALL_FRAME)[sd] = 0;
}

/* What `side` advertised as receiver: fwd_cnt unwrapped from u32 by signed steps, relative
 * to its first advertisement, and never moving back. */
static void advertise(Table *t, Py_ssize_t s, int side, int64_t raw, int64_t buf)
{
    Py_ssize_t ss = 2 * s + side;
    int64_t prev = U8(t, C_CREDIT_KNOWN)[ss] ? I64(t, C_FWD_RAW)[ss] : raw;
    int64_t delta = ((raw - prev + HALF) & U32_MASK) - HALF;
    int64_t unw = wadd(I64(t, C_FWD_UNW)[ss], delta);
    I64(t, C_FWD_UNW)[ss] = unw;
    I64(t, C_FWD_MAX)[ss] = max64(I64(t, C_FWD_MAX)[ss], unw);
    I64(t, C_FWD_RAW)[ss] = raw;
    I64(t, C_BUF_ALLOC)[ss] = buf;
    U8(t, C_CREDIT_KNOWN)[ss] = 1;
}

static void violation(Table *t, Py_ssize_t s, int sender, int kind, int64_t frame)
{
    Py_ssize_t i = (2 * s + sender) * NVIOL + kind;
    I64(t, C_VIOLATION_COUNT)[i]++;
    I64(t, C_VIOLATION_FIRST)[i] = min64(I64(t, C_VIOLATION_FIRST)[i], frame);
    I64(t, C_VIOLATION_LAST)[i] = max64(I64(t, C_VIOLATION_LAST)[i], frame);
}

typedef struct {
    int8_t *sender;
    int64_t *in_flight, *limit;
    uint8_t *beyond;
} Out;

/* One row: counters, closes, credit, stalls and violations of its stream (table row s).
 * Returns whether the row is a control event (kept by Python). */
static int track_row(const Headers *h, Py_ssize_t i, Py_ssize_t s, int64_t frame, int64_t ts,
                     uint16_t anom, Table *t, Out *o)
{
    uint64_t scid = field(h, i, F_SRC_CID), dcid = field(h, i, F_DST_CID);
    uint32_t sport = (uint32_t)field(h, i, F_SRC_PORT), dport = (uint32_t)field(h, i, F_DST_PORT);
    int op = (int)field(h, i, F_OP);
    int64_t len = (int64_t)field(h, i, F_LEN), flags = (int64_t)field(h, i, F_FLAGS);
    int src_lo = scid < dcid || (scid == dcid && sport <= dport);
    int looped = scid == dcid && sport == dport;
    /* a frame addressed to its own sender counts as the client's */
    int sender = (src_lo != (U8(t, C_CLIENT_IS_LOWER)[s] != 0)) && !looped;
    Py_ssize_t ss = 2 * s + sender;
    int rw = op == OP_RW;

    I64(t, C_LAST_FRAME)[s] = frame;
    I64(t, C_LAST_TS)[s] = ts;
    I64(t, C_PACKETS)[ss]++;
    if (rw) {
        I64(t, C_RW_PACKETS)[ss]++;
        if (field(h, i, F_TYPE) == TYPE_SEQPACKET) {
            /* a message carries EOR when its last piece (the EOM one) does */
            I64(t, C_EOM_PACKETS)[ss] += (flags & SEQ_EOM) != 0;
            I64(t, C_EOR_PACKETS)[ss] += (flags & (SEQ_EOM | SEQ_EOR)) == (SEQ_EOM | SEQ_EOR);
        }
        I64(t, C_FIRST_RW_FRAME)[ss] = min64(I64(t, C_FIRST_RW_FRAME)[ss], frame);
        I64(t, C_LAST_RW_FRAME)[ss] = max64(I64(t, C_LAST_RW_FRAME)[ss], frame);
    }
    I64(t, C_CREDIT_UPDATES)[ss] += op == OP_CREDIT_UPDATE;
    I64(t, C_CREDIT_REQUESTS)[ss] += op == OP_CREDIT_REQUEST;
    if (op == OP_RESPONSE)
        I64(t, C_RESPONSE_FRAME)[s] = min64(I64(t, C_RESPONSE_FRAME)[s], frame);
    if (op == OP_RST)
        U8(t, C_CLOSED)[s] |= 4;
    if (op == OP_SHUTDOWN) {
        if (flags & SHUT_SEND) {
            I64(t, C_SHUTDOWN_SEND_FRAME)[ss] = min64(I64(t, C_SHUTDOWN_SEND_FRAME)[ss], frame);
            U8(t, C_CLOSED)[s] |= (uint8_t)(1 << sender);
        }
        if (flags & SHUT_RCV)
            U8(t, C_CLOSED)[s] |= (uint8_t)(1 << (1 - sender));
    }

    /* credit: the check before the row's own advertisement, the state after it */
    int known_before[2];
    int64_t credit_before[2];
    for (int d = 0; d < 2; d++) {
        Py_ssize_t sr = 2 * s + (1 - d);
        known_before[d] = U8(t, C_CREDIT_KNOWN)[sr];
        credit_before[d] = wsub(I64(t, C_BUF_ALLOC)[sr],
                                wsub(wsub(I64(t, C_TX_BYTES)[2 * s + d], I64(t, C_FWD_MAX)[sr]),
                                     known_before[d] ? I64(t, C_OUTSTANDING_FLOOR)[2 * s + d]
                                                     : 0));
    }
    if (op == OP_REQUEST || op == OP_RESPONSE || op == OP_SHUTDOWN || rw
        || op == OP_CREDIT_UPDATE || op == OP_CREDIT_REQUEST)
        advertise(t, s, sender, (int64_t)field(h, i, F_FWD), (int64_t)field(h, i, F_BUF));
    int beyond = 0;
    Py_ssize_t r = h->row[i];
    for (int d = 0; d < 2; d++) {
        if (rw && sender == d) {
            beyond |= known_before[d] && len > credit_before[d];
            I64(t, C_TX_BYTES)[2 * s + d] = wadd(I64(t, C_TX_BYTES)[2 * s + d], len);
        }
        credit_after(t, s, d, frame, ts, &o->in_flight[2 * r + d], &o->limit[2 * r + d]);
    }

    if (rw && U8(t, C_START_SEEN)[s] && frame < I64(t, C_RESPONSE_FRAME)[s])
        violation(t, s, sender, V_BEFORE_RESPONSE, frame);
    if (rw && frame > I64(t, C_SHUTDOWN_SEND_FRAME)[ss])
        violation(t, s, sender, V_AFTER_SHUTDOWN, frame);
    if (anom & ANOM_PAYLOAD_LEN)
        violation(t, s, sender, V_TAP_LENGTH, frame);
    if (beyond)
        violation(t, s, sender, V_BEYOND, frame);
    o->sender[r] = (int8_t)sender;
    o->beyond[r] = (uint8_t)beyond;
    return !rw && op != OP_CREDIT_UPDATE;
}

/* The control events' columns, in the order Python passes them (tracker._EVENTS). */
enum { E_SID, E_FRAME, E_TS, E_OP, E_SENDER, E_FLAGS, E_LEN, E_BUF, E_FWD, NEV };
static const ColSpec EVENT_COLS[NEV] = {
    {"sid", 8, 1}, {"frame", 8, 1}, {"ts", 8, 1}, {"op", 2, 1}, {"sender", 1, 1},
    {"flags", 4, 1}, {"len", 4, 1}, {"buf", 4, 1}, {"fwd", 4, 1},
};

typedef struct {
    Py_buffer b[NEV];
    int held;
} Events;

#define EV(e, c, type) ((type *)(e)->b[c].buf)

/* Write the control events (positions `pos` of the rows, k of them, in frame order) to the
 * event columns by table row, then frame: a counting sort on the slots (the table is in
 * stream order, so by stream), stable, with `count` (capacity + 1 zeros) as its scratch. */
static void keep_events(const Headers *h, const int64_t *pos, Py_ssize_t k, const int64_t *slot,
                        Py_ssize_t cap, Py_ssize_t *count, const int64_t *sid, int64_t first,
                        const int64_t *ts, const int8_t *sender, Events *e)
{
    for (Py_ssize_t j = 0; j < k; j++)
        count[slot[pos[j]] + 1]++;
    for (Py_ssize_t s = 0; s < cap; s++)
        count[s + 1] += count[s];
    for (Py_ssize_t j = 0; j < k; j++) {
        Py_ssize_t i = pos[j], r = h->row[i], d = count[slot[i]]++;
        EV(e, E_SID, int64_t)[d] = sid[i];
        EV(e, E_FRAME, int64_t)[d] = wadd(first, r);
        EV(e, E_TS, int64_t)[d] = ts[r];
        EV(e, E_OP, uint16_t)[d] = (uint16_t)field(h, i, F_OP);
        EV(e, E_SENDER, int8_t)[d] = sender[r];
        EV(e, E_FLAGS, uint32_t)[d] = (uint32_t)field(h, i, F_FLAGS);
        EV(e, E_LEN, uint32_t)[d] = (uint32_t)field(h, i, F_LEN);
        EV(e, E_BUF, uint32_t)[d] = (uint32_t)field(h, i, F_BUF);
        EV(e, E_FWD, uint32_t)[d] = (uint32_t)field(h, i, F_FWD);
    }
}

PyDoc_STRVAR(track_doc,
"track(headers, layout, rows, first, ts_ns, anomalies, slots, streams, capacity, columns,\n"
"      sender, in_flight, limit, beyond, events) -> int\n\n"
"Track `rows` of a batch (frame = first + row), in order, each against table row\n"
"`slots[i]` of the StreamTable `columns` (COLUMNS order, `capacity` rows; the table in\n"
"stream order), row i of stream `streams[i]`. Writes each row's sender, credit and\n"
"beyond-credit flag into the batch-sized tag arrays, and the control events, by stream\n"
"then frame, into the first rows of the `events` columns (EVENT_COLUMNS order, len(rows)\n"
"each); returns their number.");

static PyObject *track(PyObject *self, PyObject *args)
{
    PyObject *buf, *layout, *rows, *ts_o, *an_o, *sl_o, *st_o, *cols, *se_o, *if_o, *li_o,
        *be_o, *ev_o;
    long long first;
    Py_ssize_t cap;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OO!OLOOOOnO!OOOOO!", &buf, &PyTuple_Type, &layout, &rows,
                          &first, &ts_o, &an_o, &sl_o, &st_o, &cap, &PyTuple_Type, &cols,
                          &se_o, &if_o, &li_o, &be_o, &PyTuple_Type, &ev_o))
        return NULL;
    Headers h;
    if (headers_parse(&h, buf, layout, rows) < 0)
        return NULL;
    Py_buffer ts, an, sl, st, se, inf, li, be;
    Py_buffer *held[] = {&ts, &an, &sl, &st, &se, &inf, &li, &be};
    Table t;
    Events ev;
    int64_t *pos = NULL;
    Py_ssize_t *count = NULL;
    int got = 0;
    if (get_sized(ts_o, &ts, h.n, 8, 0, "ts_ns") < 0)
        goto done;
    got++;
    if (get_sized(an_o, &an, h.n, 2, 0, "anomalies") < 0)
        goto done;
    got++;
    if (get_sized(sl_o, &sl, h.m, 8, 0, "slots") < 0)
        goto done;
    got++;
    if (get_sized(st_o, &st, h.m, 8, 0, "streams") < 0)
        goto done;
    got++;
    if (get_sized(se_o, &se, h.n, 1, 1, "sender") < 0)
        goto done;
    got++;
    if (get_sized(if_o, &inf, 2 * h.n, 8, 1, "in_flight") < 0)
        goto done;
    got++;
    if (get_sized(li_o, &li, 2 * h.n, 8, 1, "limit") < 0)
        goto done;
    got++;
    if (get_sized(be_o, &be, h.n, 1, 1, "beyond") < 0)
        goto done;
    got++;
    if (columns_parse(t.b, &t.held, cols, COLS, NCOLS, cap, "columns", "COLUMNS") < 0)
        goto done;
    got++;
    if (columns_parse(ev.b, &ev.held, ev_o, EVENT_COLS, NEV, h.m, "events",
                      "EVENT_COLUMNS") < 0)
        goto done;
    got++;
    const int64_t *slot = sl.buf;
    for (Py_ssize_t i = 0; i < h.m; i++)
        if (slot[i] < 0 || slot[i] >= cap) {
            PyErr_SetString(PyExc_IndexError, "slots: a slot outside the table");
            goto done;
        }
    pos = PyMem_Malloc((h.m ? (size_t)h.m : 1) * sizeof *pos);
    count = PyMem_Calloc((size_t)cap + 1, sizeof *count);
    if (!pos || !count) {
        PyErr_NoMemory();
        goto done;
    }
    Out o = {se.buf, inf.buf, li.buf, be.buf};
    const int64_t *tsv = ts.buf;
    const uint16_t *anv = an.buf;
    Py_ssize_t k = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < h.m; i++) {
        Py_ssize_t r = h.row[i];
        if (track_row(&h, i, slot[i], wadd(first, r), tsv[r], anv[r], &t, &o))
            pos[k++] = i;
    }
    keep_events(&h, pos, k, slot, cap, count, st.buf, first, tsv, o.sender, &ev);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(k);
done:
    PyMem_Free(pos);
    PyMem_Free(count);
    if (got > 9)
        columns_release(ev.b, &ev.held);
    if (got > 8)
        columns_release(t.b, &t.held);
    for (int j = 0; j < got && j < 8; j++)
        PyBuffer_Release(held[j]);
    headers_release(&h);
    return result;
}

/* ---- the module --------------------------------------------------------------------------- */

static PyMethodDef KeyMap_methods[] = {
    {"put", (PyCFunction)KeyMap_put, METH_VARARGS, put_doc},
    {"assign", (PyCFunction)KeyMap_assign, METH_VARARGS, assign_doc},
    {"discard", (PyCFunction)KeyMap_discard, METH_VARARGS, discard_doc},
    {"drop", (PyCFunction)KeyMap_drop, METH_VARARGS, drop_doc},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods KeyMap_seq = {.sq_length = (lenfunc)KeyMap_len};

static PyTypeObject KeyMapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vsockmon.conntrack._track.KeyMap",
    .tp_doc = PyDoc_STR("Connection key -> current stream, 40 bytes a key (see the file's "
                        "comment)."),
    .tp_basicsize = sizeof(KeyMap),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = KeyMap_new,
    .tp_dealloc = (destructor)KeyMap_dealloc,
    .tp_methods = KeyMap_methods,
    .tp_as_sequence = &KeyMap_seq,
};

static PyMethodDef methods[] = {
    {"track", track, METH_VARARGS, track_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vsockmon.conntrack._track",
    "Connection tracking's key map and per-row pass, compiled (see tracker.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

static PyObject *column_specs(const ColSpec *cols, int n)
{
    PyObject *t = PyTuple_New(n);
    for (int c = 0; t && c < n; c++) {
        PyObject *spec = Py_BuildValue("(sii)", cols[c].name, cols[c].itemsize,
                                       cols[c].width);
        if (!spec) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, c, spec);
    }
    return t;
}

static PyObject *constants(void)
{
    return Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:(iiii),s:i,s:i}",
        "REQUEST", OP_REQUEST, "RESPONSE", OP_RESPONSE, "RST", OP_RST, "SHUTDOWN", OP_SHUTDOWN,
        "RW", OP_RW, "CREDIT_UPDATE", OP_CREDIT_UPDATE, "CREDIT_REQUEST", OP_CREDIT_REQUEST,
        "SEQPACKET", TYPE_SEQPACKET, "RCV", SHUT_RCV, "SEND", SHUT_SEND, "EOM", SEQ_EOM,
        "EOR", SEQ_EOR, "PAYLOAD_LEN", ANOM_PAYLOAD_LEN, "VIOLATIONS", V_BEYOND,
        V_AFTER_SHUTDOWN, V_BEFORE_RESPONSE, V_TAP_LENGTH, "START_LOWER", START_LOWER,
        "START_HIGHER", START_HIGHER);
}

PyMODINIT_FUNC PyInit__track(void)
{
    if (PyType_Ready(&KeyMapType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyObject *fields = PyTuple_New(NFIELDS);
    for (int f = 0; fields && f < NFIELDS; f++) {
        PyObject *spec = Py_BuildValue("(si)", FIELD_NAMES[f], FIELD_SIZES[f]);
        if (!spec) {
            Py_CLEAR(fields);
            break;
        }
        PyTuple_SET_ITEM(fields, f, spec);
    }
    if (!fields || PyModule_AddObject(m, "HEADER_FIELDS", fields) < 0
        || PyModule_AddObject(m, "COLUMNS", column_specs(COLS, NCOLS)) < 0
        || PyModule_AddObject(m, "EVENT_COLUMNS", column_specs(EVENT_COLS, NEV)) < 0
        || PyModule_AddObject(m, "CONSTANTS", constants()) < 0
        || PyModule_AddObject(m, "KeyMap", Py_NewRef((PyObject *)&KeyMapType)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

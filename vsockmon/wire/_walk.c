/* The pcap and pcapng record walk and the header gather, compiled.
 *
 * Walking records in Python costs about 0.6 s per million packets, more than everything the
 * bulk decoder does after it; here it is a few milliseconds. The rules stay in pcapio.py:
 * these functions only find the records of one chunk and say where and why they stopped, and
 * pcapio turns that into batches and messages. Interface description and section header
 * blocks are handed back to Python (they are rare, and their options are parsed there).
 *
 * Every read is bounds-checked against the buffer: any byte sequence is safe to walk.
 * No numpy: outputs are bytes of native int64 columns, which numpy views without a copy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Why a walk stopped (the rest of the chunk is left to pcapio). */
enum {
    WALK_END = 0,          /* every whole record walked; value = bytes the next one needs */
    WALK_BAD_RECORD = 1,   /* pcap record with captured length > max_record; value = caplen */
    WALK_BAD_BLOCK = 2,    /* pcapng block length < 12, unaligned or too big; value = length */
    WALK_CONTROL = 3,      /* pcapng section header or interface description: Python's */
    WALK_BAD_IFACE = 4,    /* packet on an interface not declared; value = interface */
    WALK_BAD_PACKET = 5,   /* packet block whose data overruns the block; value = caplen */
};

#define MAX_TS_NS INT64_MAX

static inline uint32_t rd32(const uint8_t *p, int big)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return big ? __builtin_bswap32(v) : v;
}

/* Growable native int64 columns: offset, caplen, orig_len, ts_ns, linktype. */
#define NCOLS 5
typedef struct {
    int64_t *col[NCOLS];
    Py_ssize_t n, cap;
} Columns;

static int columns_init(Columns *c, Py_ssize_t cap)
{
    c->n = 0;
    c->cap = cap < 16 ? 16 : cap;
    for (int i = 0; i < NCOLS; i++) {
        c->col[i] = PyMem_Malloc((size_t)c->cap * sizeof(int64_t));
        if (!c->col[i]) {
            for (int j = 0; j < i; j++)
                PyMem_Free(c->col[j]);
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static void columns_free(Columns *c)
{
    for (int i = 0; i < NCOLS; i++)
        PyMem_Free(c->col[i]);
}

static inline void columns_add(Columns *c, int64_t off, int64_t cap, int64_t orig, int64_t ts,
                               int64_t linktype)
{
    /* cap is sized from the smallest record, so this never overflows (checked anyway). */
    if (c->n >= c->cap)
        return;
    c->col[0][c->n] = off;
    c->col[1][c->n] = cap;
    c->col[2][c->n] = orig;
    c->col[3][c->n] = ts;
    c->col[4][c->n] = linktype;
    c->n++;
}

/* (n, offsets, caplens, orig_lens, ts_ns, linktypes, end offset, status, value) */
static PyObject *walk_result(Columns *c, Py_ssize_t off, int status, long long value)
{
    PyObject *cols[NCOLS] = {0};
    PyObject *out = NULL;
    for (int i = 0; i < NCOLS; i++) {
        cols[i] = PyBytes_FromStringAndSize((const char *)c->col[i],
                                            c->n * (Py_ssize_t)sizeof(int64_t));
        if (!cols[i])
            goto done;
    }
    out = Py_BuildValue("nOOOOOniL", c->n, cols[0], cols[1], cols[2], cols[3], cols[4], off,
                        status, value);
done:
    for (int i = 0; i < NCOLS; i++)
        Py_XDECREF(cols[i]);
    columns_free(c);
    return out;
}

PyDoc_STRVAR(walk_pcap_doc,
"walk_pcap(buf, big_endian, ts_scale, linktype, max_record)\n"
"-> (n, offsets, caplens, orig_lens, ts_ns, linktypes, end, status, value)\n\n"
"Walk the whole pcap records of buf (no file header). Columns are native int64 bytes.");

static PyObject *walk_pcap(PyObject *self, PyObject *args)
{
    Py_buffer view;
    int big;
    long long scale, linktype, max_record;
    if (!PyArg_ParseTuple(args, "y*pLLL", &view, &big, &scale, &linktype, &max_record))
        return NULL;
    const uint8_t *buf = view.buf;
    Py_ssize_t end = view.len, off = 0;
    Columns c;
    if (columns_init(&c, end / 16 + 1) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int status = WALK_END;
    long long value = 0;
    Py_BEGIN_ALLOW_THREADS
    while (off < end) {
        if (end - off < 16) {
            value = 16;
            break;
        }
        const uint8_t *r = buf + off;
        uint64_t sec = rd32(r, big), frac = rd32(r + 4, big);
        int64_t cap = rd32(r + 8, big), orig = rd32(r + 12, big);
        if (cap > max_record) {
            status = WALK_BAD_RECORD;
            value = cap;
            break;
        }
        if (end - off - 16 < cap) {
            value = 16 + cap;
            break;
        }
        /* sec < 2^32 and frac * scale < 2^42: the sum stays far inside int64. */
        columns_add(&c, off + 16, cap, orig, (int64_t)(sec * 1000000000u + frac * scale),
                    linktype);
        off += 16 + cap;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return walk_result(&c, off, status, value);
}

/* ns from a pcapng timestamp in ticks of the if_tsresol code `code`, floored and clamped
 * like pcapio's Python arithmetic (ticks * num // den). */
static int64_t ticks_to_ns(uint64_t ticks, unsigned code)
{
    unsigned exp = code & 0x7F;
    unsigned __int128 ns;
    if (code & 0x80) {
        ns = ((unsigned __int128)ticks * 1000000000u) >> exp;
    } else if (exp <= 9) {
        uint64_t mul = 1;
        for (unsigned i = exp; i < 9; i++)
            mul *= 10;
        ns = (unsigned __int128)ticks * mul;
    } else {
        if (exp - 9 > 19)
            return 0; /* 10^20 > any 64-bit tick count */
        uint64_t div = 1;
        for (unsigned i = 9; i < exp; i++)
            div *= 10;
        ns = ticks / div;
    }
    return ns > (unsigned __int128)MAX_TS_NS ? MAX_TS_NS : (int64_t)ns;
}

PyDoc_STRVAR(walk_pcapng_doc,
"walk_pcapng(buf, start, big_endian, interfaces, max_record)\n"
"-> (n, offsets, caplens, orig_lens, ts_ns, linktypes, end, status, value)\n\n"
"Walk the whole pcapng blocks of buf from offset start. interfaces is a sequence of\n"
"(linktype, if_tsresol code, snaplen). Stops before a section header or interface\n"
"description block (status WALK_CONTROL) for the caller to parse.");

static PyObject *walk_pcapng(PyObject *self, PyObject *args)
{
    Py_buffer view;
    int big;
    PyObject *ifaces_obj;
    long long max_record;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "y*npOL", &view, &start, &big, &ifaces_obj, &max_record))
        return NULL;
    PyObject *ifaces = PySequence_Fast(ifaces_obj, "interfaces must be a sequence");
    if (!ifaces) {
        PyBuffer_Release(&view);
        return NULL;
    }
    Py_ssize_t nif = PySequence_Fast_GET_SIZE(ifaces);
    long long *linktype = PyMem_Malloc(sizeof(long long) * (size_t)(nif + 1));
    unsigned *code = PyMem_Malloc(sizeof(unsigned) * (size_t)(nif + 1));
    long long *snap = PyMem_Malloc(sizeof(long long) * (size_t)(nif + 1));
    Columns c;
    int ok = linktype && code && snap;
    for (Py_ssize_t i = 0; ok && i < nif; i++) {
        unsigned long long l, s;
        unsigned int k;
        PyObject *t = PySequence_Fast_GET_ITEM(ifaces, i);
        if (!PyArg_ParseTuple(t, "KIK", &l, &k, &s)) {
            ok = 0;
            break;
        }
        linktype[i] = (long long)l;
        code[i] = k & 0xFF;
        snap[i] = (long long)s;
    }
    if (ok && columns_init(&c, view.len / 12 + 1) < 0)
        ok = 0;
    if (!ok) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        PyMem_Free(linktype);
        PyMem_Free(code);
        PyMem_Free(snap);
        Py_DECREF(ifaces);
        PyBuffer_Release(&view);
        return NULL;
    }
    const uint8_t *buf = view.buf;
    Py_ssize_t end = view.len, off = start < 0 ? 0 : start > end ? end : start;
    int status = WALK_END;
    long long value = 0;
    Py_BEGIN_ALLOW_THREADS
    while (off < end) {
        if (end - off < 12) {
            value = 12;
            break;
        }
        const uint8_t *b = buf + off;
        uint32_t btype = rd32(b, big);
        /* section header, interface description, interface statistics: read by Python */
        if (btype == 0x0A0D0D0A || btype == 1 || btype == 5) {
            status = WALK_CONTROL;
            break;
        }
        int64_t blen = rd32(b + 4, big);
        if (blen < 12 || blen % 4 || blen > max_record) {
            status = WALK_BAD_BLOCK;
            value = blen;
            break;
        }
        if (end - off < blen) {
            value = blen;
            break;
        }
        Py_ssize_t body = off + 8, limit = off + blen - 4;
        if (btype == 6 && blen >= 32) { /* enhanced packet block */
            uint64_t iface = rd32(buf + body, big);
            uint64_t ticks = ((uint64_t)rd32(buf + body + 4, big) << 32)
                             | rd32(buf + body + 8, big);
            int64_t cap = rd32(buf + body + 12, big), orig = rd32(buf + body + 16, big);
            if (iface >= (uint64_t)nif) {
                status = WALK_BAD_IFACE;
                value = (long long)iface;
                break;
            }
            if (body + 20 + cap > limit) {
                status = WALK_BAD_PACKET;
                value = cap;
                break;
            }
            columns_add(&c, body + 20, cap, orig, ticks_to_ns(ticks, code[iface]),
                        linktype[iface]);
        } else if (btype == 3 && blen >= 16) { /* simple packet block: interface 0 */
            int64_t orig = rd32(buf + body, big);
            if (nif == 0) {
                status = WALK_BAD_IFACE;
                value = 0;
                break;
            }
            int64_t cap = snap[0] && snap[0] < orig ? snap[0] : orig;
            if (body + 4 + cap > limit) {
                status = WALK_BAD_PACKET;
                value = cap;
                break;
            }
            columns_add(&c, body + 4, cap, orig, 0, linktype[0]);
        }
        off += blen;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(linktype);
    PyMem_Free(code);
    PyMem_Free(snap);
    Py_DECREF(ifaces);
    PyBuffer_Release(&view);
    return walk_result(&c, off, status, value);
}

PyDoc_STRVAR(gather_doc,
"gather(buf, offsets, caplens, mon_len, mon_out, virtio_len, virtio_out, transport_at,\n"
"       transport_virtio)\n\n"
"Copy the fixed headers of every packet into two packed tables: row i of mon_out gets the\n"
"mon_len bytes at offsets[i] when caplens[i] >= mon_len, else zeros; row i of virtio_out\n"
"gets the virtio_len bytes that follow when the packet also holds them and its u16 at\n"
"transport_at (little-endian) equals transport_virtio, else zeros. offsets and caplens are\n"
"native int64; a row outside buf is zeros.");

static PyObject *gather(PyObject *self, PyObject *args)
{
    Py_buffer buf, offs, caps, mon, vio;
    Py_ssize_t mon_len, vio_len, transport_at;
    unsigned int transport_virtio;
    if (!PyArg_ParseTuple(args, "y*y*y*nw*nw*nI", &buf, &offs, &caps, &mon_len, &mon, &vio_len,
                          &vio, &transport_at, &transport_virtio))
        return NULL;
    Py_ssize_t n = offs.len / (Py_ssize_t)sizeof(int64_t);
    PyObject *result = NULL;
    if (caps.len / (Py_ssize_t)sizeof(int64_t) != n || mon_len <= 0 || vio_len <= 0
        || mon.len != n * mon_len || vio.len != n * vio_len || transport_at < 0
        || transport_at + 2 > mon_len) {
        PyErr_SetString(PyExc_ValueError, "gather: column sizes disagree");
        goto out;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *src = buf.buf;
    uint8_t *m = mon.buf, *v = vio.buf;
    const int64_t *o = offs.buf, *cl = caps.buf;
    for (Py_ssize_t i = 0; i < n; i++, m += mon_len, v += vio_len) {
        int64_t off = o[i], cap = cl[i];
        int inside = off >= 0 && cap >= 0 && off <= buf.len && cap <= buf.len - off;
        if (inside && cap >= mon_len) {
            memcpy(m, src + off, (size_t)mon_len);
            unsigned transport = m[transport_at] | (unsigned)m[transport_at + 1] << 8;
            if (transport == transport_virtio && cap - mon_len >= vio_len)
                memcpy(v, src + off + mon_len, (size_t)vio_len);
            else
                memset(v, 0, (size_t)vio_len);
        } else {
            memset(m, 0, (size_t)mon_len);
            memset(v, 0, (size_t)vio_len);
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&caps);
    PyBuffer_Release(&mon);
    PyBuffer_Release(&vio);
    return result;
}

static PyMethodDef methods[] = {
    {"walk_pcap", walk_pcap, METH_VARARGS, walk_pcap_doc},
    {"walk_pcapng", walk_pcapng, METH_VARARGS, walk_pcapng_doc},
    {"gather", gather, METH_VARARGS, gather_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vsockmon.wire._walk",
    "The pcap/pcapng record walk and the header gather, compiled (see pcapio.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__walk(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "WALK_END", WALK_END) < 0
        || PyModule_AddIntConstant(m, "WALK_BAD_RECORD", WALK_BAD_RECORD) < 0
        || PyModule_AddIntConstant(m, "WALK_BAD_BLOCK", WALK_BAD_BLOCK) < 0
        || PyModule_AddIntConstant(m, "WALK_CONTROL", WALK_CONTROL) < 0
        || PyModule_AddIntConstant(m, "WALK_BAD_IFACE", WALK_BAD_IFACE) < 0
        || PyModule_AddIntConstant(m, "WALK_BAD_PACKET", WALK_BAD_PACKET) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

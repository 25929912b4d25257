/* vsockmon.live._ring: one TPACKET_V3 ring block -> capture file records, in one call.
 *
 * Why C: under the lab's emulation every Python operation costs 15-30x, and a burst of small
 * frames (20,000 one-byte sends) outran a reader that did a few Python operations per frame:
 * the kernel's ring filled, or the capture stopped with frames still in it. Here a whole
 * block (thousands of frames) becomes one bytes object of pcap or pcapng records, an index
 * and the per-op counts, with no Python object per frame. The caller releases the block to
 * the kernel as soon as this returns (the records are a copy) and writes them in one write.
 *
 * The block is read as untrusted bytes: every offset and length is checked against the
 * buffer, and a block that does not add up ends the walk there ("damaged" in the result).
 * Values are read in host byte order (the kernel's); records are written little-endian, as
 * vsockmon.wire.pcapio writes them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FMT_PCAP 0
#define FMT_PCAPNG 1

/* struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1 */
#define BLK_NUM_PKTS 12
#define BLK_FIRST_PKT 16
/* struct tpacket3_hdr */
#define PKT_NEXT 0
#define PKT_SEC 4
#define PKT_NSEC 8
#define PKT_SNAPLEN 12
#define PKT_LEN 16
#define PKT_MAC 24
#define PKT_MIN 28 /* up to and including tp_net */

#define PCAP_REC 16
#define EPB_HEAD 28
#define EPB_TAIL 4
#define INDEX_FIELDS 5 /* ts_ns, record end, data offset, captured length, original length */
#define SMALL_OPS 64

static uint32_t get32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint16_t get16(const unsigned char *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static void put_le32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* Where each frame lies in the block, found by the checked walk. */
typedef struct {
    uint64_t ts_ns;
    size_t data;
    uint32_t snap;
    uint32_t len;
} Frame;

/* Walk up to `limit` frames; fills `frames` (capacity `cap`), returns how many, and sets
 * *damaged when the block's numbers point outside it. */
static Py_ssize_t walk(const unsigned char *b, size_t size, Py_ssize_t limit, Frame *frames,
                       Py_ssize_t cap, int *damaged) {
    *damaged = 0;
    if (size < BLK_FIRST_PKT + 4) {
        *damaged = 1;
        return 0;
    }
    uint32_t num = get32(b + BLK_NUM_PKTS);
    size_t pos = get32(b + BLK_FIRST_PKT);
    Py_ssize_t n = 0;
    for (uint32_t i = 0; i < num && n < limit && n < cap; i++) {
        if (pos > size || size - pos < PKT_MIN) {
            *damaged = 1;
            break;
        }
        const unsigned char *h = b + pos;
        size_t data = pos + get16(h + PKT_MAC);
        uint32_t snap = get32(h + PKT_SNAPLEN);
        if (data > size || size - data < snap) {
            *damaged = 1;
            break;
        }
        frames[n].ts_ns = (uint64_t)get32(h + PKT_SEC) * 1000000000u + get32(h + PKT_NSEC);
        frames[n].data = data;
        frames[n].snap = snap;
        frames[n].len = get32(h + PKT_LEN);
        n++;
        uint32_t next = get32(h + PKT_NEXT);
        if (i + 1 < num && n < limit) {
            /* The next frame starts after this one's data (the kernel's layout); an offset
             * that points back or into it is damage, and it would also let overlapping
             * frames multiply the output. */
            if (next < (data - pos) + (size_t)snap) {
                *damaged = 1;
                break;
            }
            pos += next;
        }
    }
    return n;
}

static size_t record_size(int fmt, uint32_t snap) {
    if (fmt == FMT_PCAP)
        return PCAP_REC + (size_t)snap;
    return EPB_HEAD + (size_t)snap + ((4 - (snap & 3)) & 3) + EPB_TAIL;
}

static unsigned char *put_record(unsigned char *o, int fmt, const Frame *f,
                                 const unsigned char *b) {
    if (fmt == FMT_PCAP) {
        put_le32(o, (uint32_t)(f->ts_ns / 1000000000u));
        put_le32(o + 4, (uint32_t)(f->ts_ns % 1000000000u));
        put_le32(o + 8, f->snap);
        put_le32(o + 12, f->len);
        memcpy(o + PCAP_REC, b + f->data, f->snap);
        return o + PCAP_REC + f->snap;
    }
    uint32_t total = (uint32_t)record_size(fmt, f->snap);
    size_t pad = (4 - (f->snap & 3)) & 3;
    put_le32(o, 6); /* enhanced packet block */
    put_le32(o + 4, total);
    put_le32(o + 8, 0); /* interface 0 */
    put_le32(o + 12, (uint32_t)(f->ts_ns >> 32));
    put_le32(o + 16, (uint32_t)f->ts_ns);
    put_le32(o + 20, f->snap);
    put_le32(o + 24, f->len);
    memcpy(o + EPB_HEAD, b + f->data, f->snap);
    memset(o + EPB_HEAD + f->snap, 0, pad);
    put_le32(o + EPB_HEAD + f->snap + pad, total);
    return o + total;
}

static int count_op(PyObject *big, uint64_t *small, unsigned op) {
    if (op < SMALL_OPS) {
        small[op]++;
        return 0;
    }
    PyObject *key = PyLong_FromUnsignedLong(op);
    if (key == NULL)
        return -1;
    PyObject *old = PyDict_GetItemWithError(big, key);
    long have = old ? PyLong_AsLong(old) : 0;
    PyObject *val = PyLong_FromLong(have + 1);
    int rc = val ? PyDict_SetItem(big, key, val) : -1;
    Py_DECREF(key);
    Py_XDECREF(val);
    return rc;
}

PyDoc_STRVAR(block_doc,
"block(buf, fmt, limit, op_offset, min_len) -> (records, index, ops, count, nbytes, damaged)\n\n"
"The frames of one TPACKET_V3 block (a buffer starting at its tpacket_block_desc), at most\n"
"`limit` of them, as consecutive capture records: fmt 0 pcap (ns), 1 pcapng enhanced packet\n"
"blocks on interface 0. `index` holds 5 native uint64 per frame: timestamp (ns), end of its\n"
"record in `records`, offset of its data in `records`, captured and original length.\n"
"`ops` counts the 16-bit little-endian value at `op_offset` of every frame at least\n"
"`min_len` long. `damaged` is True when the block's numbers pointed outside it.");

static PyObject *block(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer view;
    int fmt;
    Py_ssize_t limit, op_offset, min_len;
    if (!PyArg_ParseTuple(args, "y*innn", &view, &fmt, &limit, &op_offset, &min_len))
        return NULL;
    PyObject *result = NULL, *records = NULL, *index = NULL, *ops = NULL;
    Frame *frames = NULL;
    if (fmt != FMT_PCAP && fmt != FMT_PCAPNG) {
        PyErr_SetString(PyExc_ValueError, "fmt must be 0 (pcap) or 1 (pcapng)");
        goto done;
    }
    if (op_offset < 0 || min_len < op_offset + 2) {
        PyErr_SetString(PyExc_ValueError, "min_len must cover the op field");
        goto done;
    }
    const unsigned char *b = view.buf;
    size_t size = (size_t)view.len;
    /* A frame takes at least PKT_MIN bytes of the block: that bounds the count. */
    Py_ssize_t cap = (Py_ssize_t)(size / PKT_MIN) + 1;
    if (limit < 0 || limit > cap)
        limit = cap;
    frames = PyMem_Malloc(sizeof(Frame) * (size_t)(limit ? limit : 1));
    if (frames == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int damaged;
    Py_ssize_t n = walk(b, size, limit, frames, limit, &damaged);
    size_t total = 0;
    unsigned long long nbytes = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        total += record_size(fmt, frames[i].snap);
        nbytes += frames[i].snap;
    }
    records = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    index = PyBytes_FromStringAndSize(NULL, n * INDEX_FIELDS * (Py_ssize_t)sizeof(uint64_t));
    ops = PyDict_New();
    if (records == NULL || index == NULL || ops == NULL)
        goto done;
    unsigned char *start = (unsigned char *)PyBytes_AS_STRING(records), *o = start;
    uint64_t *ix = (uint64_t *)PyBytes_AS_STRING(index);
    uint64_t small[SMALL_OPS] = {0};
    for (Py_ssize_t i = 0; i < n; i++) {
        const Frame *f = &frames[i];
        size_t head = fmt == FMT_PCAP ? PCAP_REC : EPB_HEAD;
        ix[0] = f->ts_ns;
        ix[2] = (uint64_t)(o - start) + head;
        ix[3] = f->snap;
        ix[4] = f->len;
        o = put_record(o, fmt, f, b);
        ix[1] = (uint64_t)(o - start);
        ix += INDEX_FIELDS;
        if (f->snap >= (uint64_t)min_len &&
            count_op(ops, small, le16(b + f->data + op_offset)) < 0)
            goto done;
    }
    for (unsigned op = 0; op < SMALL_OPS; op++) {
        if (!small[op])
            continue;
        PyObject *key = PyLong_FromUnsignedLong(op);
        PyObject *val = PyLong_FromUnsignedLongLong(small[op]);
        int rc = (key && val) ? PyDict_SetItem(ops, key, val) : -1;
        Py_XDECREF(key);
        Py_XDECREF(val);
        if (rc < 0)
            goto done;
    }
    result = Py_BuildValue("OOOnKO", records, index, ops, n, nbytes,
                           damaged ? Py_True : Py_False);
done:
    PyMem_Free(frames);
    Py_XDECREF(records);
    Py_XDECREF(index);
    Py_XDECREF(ops);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"block", block, METH_VARARGS, block_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ring",
    "One TPACKET_V3 ring block to capture file records, without a Python object per frame.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ring(void) { return PyModule_Create(&module); }

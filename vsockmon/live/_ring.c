/* vsockmon.live._ring: one TPACKET_V3 ring block -> capture file records, without Python
 * work per frame.
 *
 * Why C: under the lab's emulation every Python operation costs 15-30x, and a burst of small
 * frames (20,000 one-byte sends) outran a reader that did a few Python operations per frame.
 * block() walks a whole block (thousands of frames) once: the record headers of all its
 * frames in one bytes object, an index and the per-op counts. writev() then writes the
 * records with one writev(2): headers and short frames gathered into one buffer, long frames
 * straight from the ring, not copied.
 *
 * The block is read as untrusted bytes: every offset and length is checked against the
 * buffer, and a block that does not add up ends the walk there ("damaged" in the result);
 * writev() checks its index against the buffers it is given. Values are read in host byte
 * order (the kernel's); records are written little-endian, as vsockmon.wire.pcapio writes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <limits.h>
#include <sys/uio.h>

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

/* The bytes of a record that are not the frame: its header, and pcapng's padding + length. */
static size_t head_size(int fmt) { return fmt == FMT_PCAP ? PCAP_REC : EPB_HEAD; }

static size_t tail_size(int fmt, uint64_t snap) {
    return fmt == FMT_PCAP ? 0 : ((4 - (snap & 3)) & 3) + EPB_TAIL;
}

static unsigned char *put_head(unsigned char *o, int fmt, const Frame *f) {
    if (fmt == FMT_PCAP) {
        put_le32(o, (uint32_t)(f->ts_ns / 1000000000u));
        put_le32(o + 4, (uint32_t)(f->ts_ns % 1000000000u));
        put_le32(o + 8, f->snap);
        put_le32(o + 12, f->len);
        return o + PCAP_REC;
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
    memset(o + EPB_HEAD, 0, pad);
    put_le32(o + EPB_HEAD + pad, total);
    return o + EPB_HEAD + pad + EPB_TAIL;
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
"block(buf, fmt, limit, op_offset, min_len) -> (heads, index, ops, count, nbytes, damaged)\n\n"
"The frames of one TPACKET_V3 block (a buffer starting at its tpacket_block_desc), at most\n"
"`limit` of them, as capture records: fmt 0 pcap (ns), 1 pcapng enhanced packet blocks on\n"
"interface 0. `heads` holds, frame after frame, what each record has besides the frame's\n"
"bytes: its header (and for pcapng the padding and trailing length). `index` holds 5 native\n"
"uint64 per frame: timestamp (ns), end of its record in the output, offset of its bytes in\n"
"`buf`, captured and original length. `ops` counts the 16-bit little-endian value at\n"
"`op_offset` of every frame at least `min_len` long. `damaged` is True when the block's\n"
"numbers pointed outside it.");

static PyObject *block(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer view;
    int fmt;
    Py_ssize_t limit, op_offset, min_len;
    if (!PyArg_ParseTuple(args, "y*innn", &view, &fmt, &limit, &op_offset, &min_len))
        return NULL;
    PyObject *result = NULL, *heads = NULL, *index = NULL, *ops = NULL;
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
        total += head_size(fmt) + tail_size(fmt, frames[i].snap);
        nbytes += frames[i].snap;
    }
    heads = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    index = PyBytes_FromStringAndSize(NULL, n * INDEX_FIELDS * (Py_ssize_t)sizeof(uint64_t));
    ops = PyDict_New();
    if (heads == NULL || index == NULL || ops == NULL)
        goto done;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(heads);
    uint64_t *ix = (uint64_t *)PyBytes_AS_STRING(index);
    uint64_t small[SMALL_OPS] = {0};
    uint64_t end = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const Frame *f = &frames[i];
        o = put_head(o, fmt, f);
        end += record_size(fmt, f->snap);
        ix[0] = f->ts_ns;
        ix[1] = end;
        ix[2] = f->data;
        ix[3] = f->snap;
        ix[4] = f->len;
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
    result = Py_BuildValue("OOOnKO", heads, index, ops, n, nbytes,
                           damaged ? Py_True : Py_False);
done:
    PyMem_Free(frames);
    Py_XDECREF(heads);
    Py_XDECREF(index);
    Py_XDECREF(ops);
    PyBuffer_Release(&view);
    return result;
}

/* Write every iovec, in order, however the kernel splits the writes. 0, or an errno. */
static int write_all(int fd, struct iovec *iov, size_t count) {
    while (count) {
        int chunk = count > IOV_MAX ? IOV_MAX : (int)count;
        ssize_t done = writev(fd, iov, chunk);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        while (count && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count) {
            iov->iov_base = (char *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    return 0;
}

/* Frames shorter than this are copied next to their headers, so a block of small frames is
 * one contiguous piece (one write: a writev of thousands of tiny pieces cost ~0.9 ms per
 * frame into the lab's 9p share); longer ones are written from the ring, not copied. */
#define COPY_MAX 2048

PyDoc_STRVAR(writev_doc,
"writev(fd, fmt, heads, source, index, first, last) -> None\n\n"
"Write the records of frames first..last-1 of a batch made by block() (or framed the same\n"
"way): each frame's head from `heads`, its bytes from `source`, and for pcapng its tail.\n"
"Heads and short frames are gathered into one buffer; frames of COPY_MAX bytes or more are\n"
"written from `source` without a copy. Raises OSError as os.writev does, ValueError for an\n"
"index that points outside its buffers.");

static PyObject *writev_records(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd, fmt;
    Py_buffer heads, source, index;
    Py_ssize_t first, last;
    if (!PyArg_ParseTuple(args, "iiy*y*y*nn", &fd, &fmt, &heads, &source, &index, &first,
                          &last))
        return NULL;
    PyObject *result = NULL;
    struct iovec *iov = NULL;
    unsigned char *stage = NULL;
    Py_ssize_t frames = index.len / (Py_ssize_t)(INDEX_FIELDS * sizeof(uint64_t));
    if ((fmt != FMT_PCAP && fmt != FMT_PCAPNG) || first < 0 || last > frames || first > last) {
        PyErr_SetString(PyExc_ValueError, "bad format or frame range");
        goto done;
    }
    const uint64_t *ix = (const uint64_t *)index.buf;
    /* First pass: check the index, size the staging buffer. */
    size_t at = 0, staged = 0;
    for (Py_ssize_t i = 0; i < last; i++) {
        const uint64_t *e = ix + (size_t)i * INDEX_FIELDS;
        uint64_t data = e[2], snap = e[3];
        size_t head = head_size(fmt), tail = tail_size(fmt, snap);
        if (at > (size_t)heads.len || (size_t)heads.len - at < head + tail ||
            data > (uint64_t)source.len || (uint64_t)source.len - data < snap) {
            PyErr_SetString(PyExc_ValueError, "index points outside its buffers");
            goto done;
        }
        if (i >= first)
            staged += head + tail + (snap < COPY_MAX ? (size_t)snap : 0);
        at += head + tail;
    }
    iov = PyMem_Malloc(sizeof(struct iovec) * (size_t)((last - first) * 2 + 1));
    stage = PyMem_Malloc(staged ? staged : 1);
    if (iov == NULL || stage == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Second pass: runs of staged bytes between the frames written from the ring. */
    size_t count = 0, fill = 0, run = 0; /* run: where the current staged piece starts */
    at = 0;
    for (Py_ssize_t i = 0; i < last; i++) {
        const uint64_t *e = ix + (size_t)i * INDEX_FIELDS;
        uint64_t data = e[2], snap = e[3];
        size_t head = head_size(fmt), tail = tail_size(fmt, snap);
        if (i >= first) {
            memcpy(stage + fill, (char *)heads.buf + at, head);
            fill += head;
            if (snap < COPY_MAX) {
                memcpy(stage + fill, (char *)source.buf + data, (size_t)snap);
                fill += (size_t)snap;
            } else {
                iov[count].iov_base = stage + run;
                iov[count++].iov_len = fill - run;
                iov[count].iov_base = (char *)source.buf + data;
                iov[count++].iov_len = (size_t)snap;
                run = fill;
            }
            memcpy(stage + fill, (char *)heads.buf + at + head, tail);
            fill += tail;
        }
        at += head + tail;
    }
    if (fill > run) {
        iov[count].iov_base = stage + run;
        iov[count++].iov_len = fill - run;
    }
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = write_all(fd, iov, count);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(iov);
    PyMem_Free(stage);
    PyBuffer_Release(&heads);
    PyBuffer_Release(&source);
    PyBuffer_Release(&index);
    return result;
}

static PyMethodDef methods[] = {
    {"block", block, METH_VARARGS, block_doc},
    {"writev", writev_records, METH_VARARGS, writev_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ring",
    "TPACKET_V3 ring blocks to capture file records, without Python work per frame.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ring(void) { return PyModule_Create(&module); }

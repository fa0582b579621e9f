/* The virtqueue data path in C: corral's optional fast path (issue 16).
 *
 * queue.py is the reference: this file applies exactly the rules of its docstring, in the same
 * order and with the same error text, and tests/unit/test_fastring.py drives both with the same
 * hostile queues (hypothesis) so they cannot disagree. corral.devices.virtio.fastpath is the only
 * importer; without this module (a failed build, or CORRAL_NO_FASTPATH=1) the Python path runs.
 *
 *   take(...)    pops `count` chains (the caller knows they are available) and returns them as
 *                (head, [(addr, len)...] readable, [(addr, len)...] writable) tuples
 *   net_tx(...)  the whole transmit drain of virtio-net: every chain popped, each frame sent
 *                with one writev straight from guest RAM, the used ring filled and its index
 *                published once per pass, the avail event published (EVENT_IDX); runs without
 *                the GIL
 *   blk_rw(...)  virtio-blk reads, writes and flushes: preadv/pwritev straight between a file
 *                and guest RAM, fsync, without the GIL; stops before a request of another kind
 *
 * Guest RAM is given as packed (gpa, size, host address) triples, one per memory slot; every
 * guest address is translated through them with overflow-safe bounds checks. Guest memory is
 * read once per field (the guest may change it meanwhile) and ring indices are stored with one
 * 16-bit store, as GuestMemory.store_u16 does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define DESC_SIZE 16
#define MAX_CHAIN_BYTES (1ULL << 32)
#define MAX_REGIONS 8
#define MAX_QUEUE 32768
#define VNET_HDR_LEN 12
#define MAX_FRAME (VNET_HDR_LEN + 65535 + 14 + 4)
#define ERR_LEN 200

typedef struct {
    uint64_t gpa, size;
    uint8_t *host;
} region_t;

typedef struct {
    region_t r[MAX_REGIONS];
    int n;
} ram_t;

typedef struct {
    uint64_t addr;
    uint32_t len;
} buf_t;

/* One chain as walked: buffers in order, readable ones first. */
typedef struct {
    unsigned head;
    unsigned nread, nwrite; /* buffers [0, nread) readable, [nread, nread + nwrite) writable */
    uint64_t read_len, write_len;
    buf_t *bufs; /* room for `size` buffers (a chain holds at most that many) */
} chain_t;

typedef struct {
    ram_t ram;
    uint64_t desc, avail, used;
    unsigned size, index;
    int indirect;
    uint8_t *desc_h, *avail_h, *used_h;
} queue_t;

static int parse_ram(Py_buffer *view, ram_t *ram) {
    if (view->len % 24 || view->len / 24 > MAX_REGIONS || view->len == 0) {
        PyErr_SetString(PyExc_ValueError, "regions: 1 to 8 packed (gpa, size, host) triples");
        return -1;
    }
    ram->n = (int)(view->len / 24);
    const uint64_t *p = view->buf;
    for (int i = 0; i < ram->n; i++) {
        memcpy(&ram->r[i].gpa, &p[3 * i], 8);
        memcpy(&ram->r[i].size, &p[3 * i + 1], 8);
        uint64_t h;
        memcpy(&h, &p[3 * i + 2], 8);
        ram->r[i].host = (uint8_t *)(uintptr_t)h;
    }
    return 0;
}

/* Host address of [gpa, gpa + len) when it lies inside one slot, else NULL (as
 * GuestMemory._offset: start <= gpa and gpa + len <= end). */
static uint8_t *gpa_host(const ram_t *ram, uint64_t gpa, uint64_t len) {
    for (int i = 0; i < ram->n; i++) {
        const region_t *r = &ram->r[i];
        if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

static inline uint16_t load_u16(const uint8_t *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static inline void store_u16(uint8_t *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

/* GuestMemory.fence: a full barrier between publishing an index (avail event, used idx) and
 * reading the driver's (avail idx, used_event). x86 lets a load pass an earlier store; without
 * this, device and driver can each read the other's stale index and neither kicks: a stall. */
static inline void fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static int queue_setup(queue_t *q, char *err) {
    q->desc_h = gpa_host(&q->ram, q->desc, (uint64_t)DESC_SIZE * q->size);
    q->avail_h = gpa_host(&q->ram, q->avail, 6 + 2ULL * q->size);
    q->used_h = gpa_host(&q->ram, q->used, 6 + 8ULL * q->size);
    if (!q->desc_h || !q->avail_h || !q->used_h) {
        snprintf(err, ERR_LEN, "queue %u: a ring is outside guest RAM", q->index);
        return -1;
    }
    return 0;
}

/* queue.py Virtqueue._walk, rule for rule. 0, or -1 with `err` set. */
static int walk(const queue_t *q, chain_t *c, unsigned index, char *err) {
    const uint8_t *table = q->desc_h;
    unsigned count = q->size, budget = q->size, qi = q->index, n = 0;
    int in_table = 0;
    uint64_t total = 0;
    c->nread = c->nwrite = 0;
    c->read_len = c->write_len = 0;
    for (;;) {
        if (budget == 0) {
            snprintf(err, ERR_LEN,
                     "queue %u: descriptor chain longer than the queue size %u (or a loop)", qi,
                     q->size);
            return -1;
        }
        budget--;
        uint8_t d[DESC_SIZE];
        memcpy(d, table + (size_t)DESC_SIZE * index, DESC_SIZE); /* read once */
        uint64_t addr;
        uint32_t length;
        uint16_t flags, nxt;
        memcpy(&addr, d, 8);
        memcpy(&length, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&nxt, d + 14, 2);
        if (flags & F_INDIRECT) {
            if (in_table || !q->indirect) {
                snprintf(err, ERR_LEN, "queue %u: indirect descriptor not allowed here", qi);
                return -1;
            }
            if ((flags & F_NEXT) || length == 0 || length % DESC_SIZE) {
                snprintf(err, ERR_LEN, "queue %u: bad indirect table (%u bytes)", qi, length);
                return -1;
            }
            if (length / DESC_SIZE > q->size) {
                snprintf(err, ERR_LEN,
                         "queue %u: indirect table of %u descriptors is larger than the queue "
                         "size %u",
                         qi, length / DESC_SIZE, q->size);
                return -1;
            }
            const uint8_t *t = gpa_host(&q->ram, addr, length);
            if (!t) {
                snprintf(err, ERR_LEN, "queue %u: indirect table outside RAM", qi);
                return -1;
            }
            budget++; /* the table's own descriptor is no buffer */
            table = t;
            count = length / DESC_SIZE;
            index = 0;
            in_table = 1;
            continue;
        }
        if (length) {
            if (!gpa_host(&q->ram, addr, length)) {
                snprintf(err, ERR_LEN, "queue %u: buffer 0x%llx+0x%x is outside guest RAM", qi,
                         (unsigned long long)addr, length);
                return -1;
            }
            total += length;
            if (total > MAX_CHAIN_BYTES) {
                snprintf(err, ERR_LEN, "queue %u: request larger than 4 GiB", qi);
                return -1;
            }
            if (flags & F_WRITE) {
                c->nwrite++;
                c->write_len += length;
            } else if (c->nwrite) {
                snprintf(err, ERR_LEN, "queue %u: readable buffer after a writable one", qi);
                return -1;
            } else {
                c->nread++;
                c->read_len += length;
            }
            c->bufs[n].addr = addr;
            c->bufs[n].len = length;
            n++;
        }
        if (!(flags & F_NEXT))
            return 0;
        if (nxt >= count) {
            snprintf(err, ERR_LEN, "queue %u: next descriptor %u >= %u", qi, (unsigned)nxt, count);
            return -1;
        }
        index = nxt;
    }
}

/* Queue._take: the chain at last_avail (known available); last_avail moves past it even when
 * the chain is bad (the device completes or fails it). */
static int take_one(const queue_t *q, unsigned *last_avail, chain_t *c, char *err) {
    unsigned head = load_u16(q->avail_h + 4 + 2 * (*last_avail % q->size));
    *last_avail = (*last_avail + 1) & 0xFFFF;
    c->head = head;
    if (head >= q->size) {
        snprintf(err, ERR_LEN, "queue %u: head descriptor %u >= size %u", q->index, head, q->size);
        return -1;
    }
    return walk(q, c, head, err);
}

/* Queue._pending: requests available and not taken, or -1 (err set) when the driver claims
 * more than the queue holds. */
static int pending(const queue_t *q, unsigned last_avail, char *err) {
    unsigned idx = load_u16(q->avail_h + 2);
    unsigned p = (idx - last_avail) & 0xFFFF;
    if (p > q->size) {
        snprintf(err, ERR_LEN,
                 "queue %u: avail idx %u is %u ahead of the device, more than the queue size %u",
                 q->index, idx, p, q->size);
        return -1;
    }
    return (int)p;
}

static void push_used(const queue_t *q, unsigned *used_idx, unsigned head, uint32_t written) {
    uint8_t *slot = q->used_h + 4 + 8 * (*used_idx % q->size);
    uint32_t id = head;
    memcpy(slot, &id, 4);
    memcpy(slot + 4, &written, 4);
    *used_idx = (*used_idx + 1) & 0xFFFF;
}

static PyObject *buf_list(const buf_t *b, unsigned n) {
    PyObject *list = PyList_New(n);
    if (!list)
        return NULL;
    for (unsigned i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(KI)", (unsigned long long)b[i].addr, (unsigned)b[i].len);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

static int parse_queue(queue_t *q, Py_buffer *regions, unsigned long long desc,
                       unsigned long long avail, unsigned long long used, unsigned size,
                       unsigned index, int indirect) {
    if (size == 0 || size > MAX_QUEUE || (size & (size - 1))) {
        PyErr_SetString(PyExc_ValueError, "queue size is not a power of two up to 32768");
        return -1;
    }
    if (desc % 16 || avail % 2 || used % 4) { /* ring indices are loaded and stored whole */
        PyErr_SetString(PyExc_ValueError, "rings not aligned (descriptors 16, avail 2, used 4)");
        return -1;
    }
    if (parse_ram(regions, &q->ram) < 0)
        return -1;
    q->desc = desc;
    q->avail = avail;
    q->used = used;
    q->size = size;
    q->index = index;
    q->indirect = indirect;
    return 0;
}

PyDoc_STRVAR(take_doc,
             "take(regions, desc, avail, used, size, index, indirect, last_avail, count)\n"
             "-> (chains, last_avail, error): pop `count` available chains as (head, readable,\n"
             "writable); on a broken rule the chains before it, and its message in `error`.");

static PyObject *fr_take(PyObject *self, PyObject *args) {
    Py_buffer regions;
    unsigned long long desc, avail, used;
    unsigned size, index, last_avail, count;
    int indirect;
    queue_t q;
    char err[ERR_LEN];
    if (!PyArg_ParseTuple(args, "y*KKKIIpII", &regions, &desc, &avail, &used, &size, &index,
                          &indirect, &last_avail, &count))
        return NULL;
    int bad = parse_queue(&q, &regions, desc, avail, used, size, index, indirect);
    PyBuffer_Release(&regions);
    if (bad < 0)
        return NULL;
    if (count > size) {
        PyErr_SetString(PyExc_ValueError, "count exceeds the queue size");
        return NULL;
    }
    last_avail &= 0xFFFF;
    err[0] = 0;
    if (queue_setup(&q, err) < 0)
        return Py_BuildValue("([]Is)", last_avail, err);
    buf_t *bufs = PyMem_Malloc(sizeof(buf_t) * size);
    PyObject *out = PyList_New(0);
    if (!bufs || !out) {
        PyMem_Free(bufs);
        Py_XDECREF(out);
        return PyErr_NoMemory();
    }
    chain_t c = {.bufs = bufs};
    for (unsigned i = 0; i < count; i++) {
        if (take_one(&q, &last_avail, &c, err) < 0)
            break;
        PyObject *r = buf_list(bufs, c.nread);
        PyObject *w = r ? buf_list(bufs + c.nread, c.nwrite) : NULL;
        /* "O", not "N": Py_BuildValue consumes an N argument even when it fails, so the
         * references are dropped here once, whatever happened */
        PyObject *t = w ? Py_BuildValue("(IOO)", c.head, r, w) : NULL;
        Py_XDECREF(r);
        Py_XDECREF(w);
        if (!t)
            goto fail;
        int rc = PyList_Append(out, t);
        Py_DECREF(t);
        if (rc < 0)
            goto fail;
    }
    PyMem_Free(bufs);
    if (err[0])
        return Py_BuildValue("(NIs)", out, last_avail, err);
    return Py_BuildValue("(NIO)", out, last_avail, Py_None);
fail:
    PyMem_Free(bufs);
    Py_DECREF(out);
    return NULL;
}

/* What one request handler gets and reports; it runs without the GIL. */
typedef struct {
    int fd, read_only;
    uint64_t sectors;
    struct iovec *iov;
    unsigned long long count, bytes_in, bytes_out, dropped;
} io_t;

#define HANDLED 0
#define NOT_MINE 1 /* a request the Python path serves: left in the ring, the drain stops */

typedef int (*handler_t)(const queue_t *q, const chain_t *c, io_t *io, uint32_t *written);

/* VirtioDevice.serve: drain the queue in passes, each request handed to `handle` and completed
 * with one used-index store per pass, the avail event published per pass (EVENT_IDX), at most
 * `budget` requests. Returns -1 (budget not used up), 0/1 (used up: requests left?) and sets
 * *stopped when a request was NOT_MINE. */
static int drain(queue_t *q, handler_t handle, io_t *io, int event_idx, unsigned *last_avail,
                 unsigned *used_idx, unsigned budget, chain_t *c, char *err, int *stopped) {
    *stopped = 0;
    if (queue_setup(q, err) < 0)
        return -1;
    while (budget) {
        int n = pending(q, *last_avail, err);
        if (n <= 0)
            return -1;
        if ((unsigned)n > budget)
            n = (int)budget;
        int taken = 0, failed = 0;
        for (; taken < n; taken++) {
            unsigned before = *last_avail;
            if (take_one(q, last_avail, c, err) < 0) {
                failed = 1;
                break;
            }
            uint32_t written = 0;
            if (handle(q, c, io, &written) == NOT_MINE) {
                *last_avail = before;
                *stopped = 1;
                break;
            }
            push_used(q, used_idx, c->head, written);
        }
        if (event_idx)
            store_u16(q->used_h + 4 + 8 * q->size, (uint16_t)*last_avail);
        store_u16(q->used_h + 2, (uint16_t)*used_idx); /* the pass's completions, at once */
        fence(); /* before the avail idx is read again, and used_event by needs_interrupt */
        if (failed || *stopped)
            return -1;
        budget -= (unsigned)taken;
    }
    char scratch[ERR_LEN];
    return pending(q, *last_avail, scratch) != 0;
}

static void fill_iov(const queue_t *q, const buf_t *b, unsigned n, struct iovec *iov) {
    for (unsigned i = 0; i < n; i++) {
        iov[i].iov_base = gpa_host(&q->ram, b[i].addr, b[i].len); /* checked by the walk */
        iov[i].iov_len = b[i].len;
    }
}

/* VirtioNet._send_one without a filter. */
static int net_frame(const queue_t *q, const chain_t *c, io_t *io, uint32_t *written) {
    uint64_t len = c->read_len;
    if (len <= VNET_HDR_LEN || len > MAX_FRAME) {
        io->dropped++; /* no frame, or larger than any NIC sends */
        return HANDLED;
    }
    fill_iov(q, c->bufs, c->nread, io->iov);
    ssize_t n;
    do
        n = writev(io->fd, io->iov, (int)c->nread);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        io->dropped++; /* a full tap (EAGAIN) or a frame the host refuses: lost, as on a wire */
    } else {
        io->count++;
        io->bytes_out += len - VNET_HDR_LEN;
    }
    return HANDLED;
}

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define SECTOR 512
#define S_OK 0
#define S_IOERR 1

/* VirtioBlock._handle for reads, writes and flushes whose header fills a buffer of its own
 * (what every driver sends); anything else is NOT_MINE. */
static int blk_request(const queue_t *q, const chain_t *c, io_t *io, uint32_t *written) {
    if (!c->nwrite || !c->nread || c->bufs[0].len < 16)
        return NOT_MINE;
    uint8_t hdr[16];
    memcpy(hdr, gpa_host(&q->ram, c->bufs[0].addr, 16), 16); /* read once */
    uint32_t rtype;
    uint64_t sector;
    memcpy(&rtype, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    if (rtype != T_IN && rtype != T_OUT && rtype != T_FLUSH)
        return NOT_MINE;
    io->count++;
    /* the status byte is the last writable byte; data buffers are what precedes it */
    const buf_t *st = &c->bufs[c->nread + c->nwrite - 1];
    uint8_t *status_at = gpa_host(&q->ram, st->addr + st->len - 1, 1);
    buf_t tmp[2];
    const buf_t *data;
    unsigned ndata;
    uint8_t status = S_IOERR;
    uint64_t done = 0;
    if (rtype == T_FLUSH) { /* a read-only disk has nothing to flush */
        if (io->read_only || fsync(io->fd) == 0)
            status = S_OK;
        goto out;
    }
    if (rtype == T_IN) {
        data = c->bufs + c->nread;
        ndata = c->nwrite - 1;
        fill_iov(q, data, ndata, io->iov);
        if (st->len > 1) {
            io->iov[ndata].iov_base = gpa_host(&q->ram, st->addr, st->len - 1);
            io->iov[ndata].iov_len = st->len - 1;
            ndata++;
        }
    } else {
        if (io->read_only)
            goto out;
        /* the readable buffers after the 16-byte header */
        ndata = 0;
        if (c->bufs[0].len > 16) {
            tmp[0].addr = c->bufs[0].addr + 16;
            tmp[0].len = c->bufs[0].len - 16;
            fill_iov(q, tmp, 1, io->iov);
            ndata = 1;
        }
        fill_iov(q, c->bufs + 1, c->nread - 1, io->iov + ndata);
        ndata += c->nread - 1;
    }
    uint64_t total = 0;
    for (unsigned i = 0; i < ndata; i++)
        total += io->iov[i].iov_len;
    if (total % SECTOR || sector > io->sectors || total / SECTOR > io->sectors - sector)
        goto out;
    if (ndata) {
        ssize_t n;
        do
            n = rtype == T_IN ? preadv(io->fd, io->iov, (int)ndata, (off_t)(sector * SECTOR))
                              : pwritev(io->fd, io->iov, (int)ndata, (off_t)(sector * SECTOR));
        while (n < 0 && errno == EINTR);
        if (n < 0 || (uint64_t)n != total)
            goto out;
    }
    if (rtype == T_IN) {
        io->bytes_in += total;
        done = total;
    } else {
        io->bytes_out += total;
    }
    status = S_OK;
out:
    if (status != S_OK)
        io->dropped++; /* the device's error count */
    *status_at = status;
    *written = (uint32_t)(done + 1);
    return HANDLED;
}

PyDoc_STRVAR(net_tx_doc,
             "net_tx(regions, desc, avail, used, size, index, indirect, event_idx, last_avail,\n"
             "used_idx, budget, fd) -> (last_avail, used_idx, frames, bytes, dropped, error,\n"
             "deferred): VirtioNet._transmit without a frame filter; deferred is -1 unless the\n"
             "budget ran out (then whether requests are left).");

PyDoc_STRVAR(blk_rw_doc,
             "blk_rw(regions, desc, avail, used, size, index, indirect, event_idx, last_avail,\n"
             "used_idx, budget, fd, read_only, sectors) -> (last_avail, used_idx, requests,\n"
             "read_bytes, write_bytes, errors, error, deferred, stopped): VirtioBlock's reads,\n"
             "writes and flushes on a raw image; `stopped` when another kind of request is next.");

static PyObject *run_drain(PyObject *args, int blk) {
    Py_buffer regions;
    unsigned long long desc, avail, used, sectors = 0;
    unsigned size, index, last_avail, used_idx, budget;
    int indirect, event_idx, read_only = 1;
    queue_t q;
    io_t io = {0};
    char err[ERR_LEN];
    int ok = blk ? PyArg_ParseTuple(args, "y*KKKIIppIIIipK", &regions, &desc, &avail, &used,
                                    &size, &index, &indirect, &event_idx, &last_avail, &used_idx,
                                    &budget, &io.fd, &read_only, &sectors)
                 : PyArg_ParseTuple(args, "y*KKKIIppIIIi", &regions, &desc, &avail, &used, &size,
                                    &index, &indirect, &event_idx, &last_avail, &used_idx, &budget,
                                    &io.fd);
    if (!ok)
        return NULL;
    int bad = parse_queue(&q, &regions, desc, avail, used, size, index, indirect);
    PyBuffer_Release(&regions);
    if (bad < 0)
        return NULL;
    io.read_only = read_only;
    io.sectors = sectors;
    last_avail &= 0xFFFF;
    used_idx &= 0xFFFF;
    if (budget > size)
        budget = size;
    err[0] = 0;
    buf_t *bufs = PyMem_Malloc(sizeof(buf_t) * size);
    io.iov = PyMem_Malloc(sizeof(struct iovec) * (size + 1));
    if (!bufs || !io.iov) {
        PyMem_Free(bufs);
        PyMem_Free(io.iov);
        return PyErr_NoMemory();
    }
    chain_t c = {.bufs = bufs};
    int deferred, stopped;
    Py_BEGIN_ALLOW_THREADS;
    deferred = drain(&q, blk ? blk_request : net_frame, &io, event_idx, &last_avail, &used_idx,
                     budget, &c, err, &stopped);
    Py_END_ALLOW_THREADS;
    PyMem_Free(bufs);
    PyMem_Free(io.iov);
    PyObject *error = err[0] ? PyUnicode_FromString(err) : Py_NewRef(Py_None);
    if (!error)
        return NULL;
    if (blk)
        return Py_BuildValue("(IIKKKKNii)", last_avail, used_idx, io.count, io.bytes_in,
                             io.bytes_out, io.dropped, error, deferred, stopped);
    return Py_BuildValue("(IIKKKNi)", last_avail, used_idx, io.count, io.bytes_out, io.dropped,
                         error, deferred);
}

static PyObject *fr_net_tx(PyObject *self, PyObject *args) { return run_drain(args, 0); }

static PyObject *fr_blk_rw(PyObject *self, PyObject *args) { return run_drain(args, 1); }

/* -- virtio-net receive ------------------------------------------------------------------- */
#define RX_DRAINED 0  /* the tap has no frame */
#define RX_NO_CHAIN 1 /* the guest has no (more) receive buffers, or budget is spent */
#define RX_PYTHON 2   /* the next chain is one Python serves (bad, short, aliasing, long): left */
#define RX_SPILL 3    /* a frame larger than the next chain: whole in the bounce buffer */
#define RX_FAILED 4   /* the tap's read failed (not EAGAIN): its errno is returned */

/* Whether no two buffers of the chain's writable part overlap (net.py _disjoint), for chains
 * of at most MAX_RX_BUFS buffers (the pairwise check is quadratic); a longer one is no common
 * case (Linux posts 1, or up to MAX_SKB_FRAGS + 2 without mergeable buffers) and goes to
 * Python, which sorts. */
#define MAX_RX_BUFS 64
static int disjoint(const buf_t *b, unsigned n) {
    if (n > MAX_RX_BUFS)
        return 0;
    for (unsigned i = 0; i < n; i++)
        for (unsigned j = i + 1; j < n; j++)
            if (b[i].addr < b[j].addr + b[j].len && b[j].addr < b[i].addr + b[i].len)
                return 0;
    return 1;
}

PyDoc_STRVAR(net_rx_doc,
             "net_rx(regions, desc, avail, used, size, index, indirect, event_idx, last_avail,\n"
             "used_idx, budget, fd, bounce) -> (last_avail, used_idx, frames, bytes, status,\n"
             "spilled, errno): VirtioNet._receive's common case, frames read straight into the guest's\n"
             "chains (one readv each, num_buffers 1), at most `budget`; `status` says why it\n"
             "stopped; RX_SPILL leaves the chain in the ring and the frame, `spilled` bytes,\n"
             "whole at the start of `bounce`; RX_FAILED returns the failed read's errno.");

static PyObject *fr_net_rx(PyObject *self, PyObject *args) {
    Py_buffer regions, bounce;
    unsigned long long desc, avail, used;
    unsigned size, index, last_avail, used_idx, budget;
    int indirect, event_idx, fd;
    queue_t q;
    char err[ERR_LEN];
    if (!PyArg_ParseTuple(args, "y*KKKIIppIIIiw*", &regions, &desc, &avail, &used, &size, &index,
                          &indirect, &event_idx, &last_avail, &used_idx, &budget, &fd, &bounce))
        return NULL;
    int bad = parse_queue(&q, &regions, desc, avail, used, size, index, indirect);
    PyBuffer_Release(&regions);
    if (bad < 0) {
        PyBuffer_Release(&bounce);
        return NULL;
    }
    last_avail &= 0xFFFF;
    used_idx &= 0xFFFF;
    buf_t *bufs = PyMem_Malloc(sizeof(buf_t) * size);
    struct iovec *iov = PyMem_Malloc(sizeof(struct iovec) * (size + 1));
    if (!bufs || !iov) {
        PyMem_Free(bufs);
        PyMem_Free(iov);
        PyBuffer_Release(&bounce);
        return PyErr_NoMemory();
    }
    unsigned long long frames = 0, bytes = 0;
    long long spilled = 0;
    int status = RX_NO_CHAIN, read_errno = 0;
    chain_t c = {.bufs = bufs};
    Py_BEGIN_ALLOW_THREADS;
    if (queue_setup(&q, err) < 0)
        status = RX_PYTHON;
    for (unsigned done = 0; status != RX_PYTHON && done < budget; done++) {
        int n = pending(&q, last_avail, err);
        if (n < 0) {
            status = RX_PYTHON; /* Python finds the bad index and decides */
            break;
        }
        if (n == 0) {
            status = RX_NO_CHAIN;
            break;
        }
        unsigned before = last_avail;
        int walked = take_one(&q, &last_avail, &c, err);
        if (event_idx) { /* as a pop publishes it; it stays there if the chain is put back */
            store_u16(q.used_h + 4 + 8 * q.size, (uint16_t)last_avail);
            fence(); /* before the next pending() reads the avail idx */
        }
        if (walked < 0 || c.write_len < VNET_HDR_LEN || !disjoint(bufs + c.nread, c.nwrite)) {
            last_avail = before;
            status = RX_PYTHON;
            break;
        }
        const buf_t *w = bufs + c.nread;
        fill_iov(&q, w, c.nwrite, iov);
        /* what does not fit spills into the bounce buffer past the chain's share, so that a
         * spilled frame can be put together there whole (no tap frame is longer than it) */
        size_t room = c.write_len < (uint64_t)bounce.len ? (size_t)c.write_len : (size_t)bounce.len;
        iov[c.nwrite].iov_base = (uint8_t *)bounce.buf + room;
        iov[c.nwrite].iov_len = (size_t)bounce.len - room;
        ssize_t got;
        do
            got = readv(fd, iov, (int)c.nwrite + 1);
        while (got < 0 && errno == EINTR);
        if (got < 0) { /* EAGAIN: drained; another error (a tap whose interface is gone
                        * fails every read and polls readable for ever): Python parks the tap */
            last_avail = before;
            read_errno = errno;
            status = read_errno == EAGAIN ? RX_DRAINED : RX_FAILED;
            break;
        }
        if ((uint64_t)got > c.write_len) {
            /* the chain's part copied in front of the rest: Python takes the frame from the
             * bounce buffer and never walks this chain again (the guest may change it now) */
            for (unsigned i = 0, at = 0; i < c.nwrite; at += w[i].len, i++)
                memcpy((uint8_t *)bounce.buf + at, iov[i].iov_base, w[i].len);
            last_avail = before;
            spilled = got;
            status = RX_SPILL;
            break;
        }
        /* num_buffers (bytes 10-11 of the header) = 1, wherever the buffers split it */
        uint64_t base = 0;
        for (unsigned i = 0; i < c.nwrite; base += w[i].len, i++)
            for (uint64_t at = 10; at < 12; at++)
                if (at >= base && at < base + w[i].len)
                    ((uint8_t *)iov[i].iov_base)[at - base] = at == 10 ? 1 : 0;
        push_used(&q, &used_idx, c.head, (uint32_t)got);
        frames++;
        bytes += (uint64_t)got > VNET_HDR_LEN ? (uint64_t)got - VNET_HDR_LEN : 0; /* as net.py */
        status = RX_NO_CHAIN;
    }
    if (frames) {
        store_u16(q.used_h + 2, (uint16_t)used_idx);
        fence(); /* before needs_interrupt reads used_event */
    }
    Py_END_ALLOW_THREADS;
    PyMem_Free(bufs);
    PyMem_Free(iov);
    PyBuffer_Release(&bounce);
    return Py_BuildValue("(IIKKiLi)", last_avail, used_idx, frames, bytes, status, spilled, read_errno);
}

static PyMethodDef methods[] = {
    {"take", fr_take, METH_VARARGS, take_doc},
    {"net_tx", fr_net_tx, METH_VARARGS, net_tx_doc},
    {"blk_rw", fr_blk_rw, METH_VARARGS, blk_rw_doc},
    {"net_rx", fr_net_rx, METH_VARARGS, net_rx_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastring",
    .m_doc = "corral's compiled virtqueue fast path (see fastpath.py)",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastring(void) { return PyModule_Create(&module); }

/* corral's compiled vCPU loop: KVM_RUN and the dispatch of port-I/O and MMIO exits, in C.
 *
 * `Vcpu._loop` (vcpu.py) is the reference and does exactly this in Python: enter the guest,
 * and on an I/O exit call the bus's read or write for every item (string I/O repeats it
 * `count` times), on an MMIO exit call the MMIO bus's; every other exit goes back to Python.
 * What this saves is the interpreter's work around those calls on every exit (the loop, the
 * ioctl wrapper, unpacking the run page, building and slicing bytes): the devices stay
 * Python. It does what the buses' read and write do, from the buses' own tables, a Python
 * call less per exit: port I/O from `PioBus.ports` (port -> (offset, pio_read, pio_write)),
 * MMIO from `MmioBus.index` ((starts, mappings), read afresh at each exit: a guest moving a
 * BAR replaces it); an access nobody owns, or a sink's port (None in `ports`), reads all ones
 * and drops writes without a call. The GIL is released
 * around KVM_RUN only, as fcntl.ioctl releases it.
 *
 * run(fd, run_page, pio_ports, mmio_bus, budget, kvm_run, exit_io, exit_mmio, stamps)
 *     -> (exits, reason, errno)
 *   reason >= 0: a KVM exit reason Python handles (the run page holds it);
 *   BUDGET (-1): `budget` exits served, Python looks at its flags and calls again;
 *   FAILED (-2): KVM_RUN failed with `errno` (EINTR: a kick), Python decides.
 * stamps: None, or a writable buffer of 64-bit ints that gets CLOCK_MONOTONIC nanoseconds
 *   (perf_counter_ns's clock) just before and just after each KVM_RUN, two per exit, as far as
 *   it has room: bench/dispatch_bench.py's view of this loop.
 * An exception raised by a bus call propagates (the exits served before it are lost to the
 * count, as the vCPU then stops).
 *
 * The kvm_run fields read (offsets from <linux/kvm.h>, whose ABI is fixed):
 *   exit_reason u32 @8; io: direction u8 @32, size u8 @33, port u16 @34, count u32 @36,
 *   data_offset u64 @40; mmio: phys_addr u64 @32, data u8[8] @40, len u32 @48, is_write u8 @52.
 * KVM writes the page, not the guest; even so every item an exit names is checked to lie in it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#define BUDGET (-1)
#define FAILED (-2)

static uint64_t load_le(const uint8_t *p, unsigned n) {
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void store_le(uint8_t *p, uint64_t v, unsigned n) {
    for (unsigned i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* f(a, b[, c]) with ints, or, with `name`, f.name(a, b[, c]) (no bound method made); NULL with
 * an exception set on failure */
static PyObject *call_ints(PyObject *name, PyObject *f, uint64_t a, uint64_t b, int with_c, uint64_t c) {
    PyObject *args[4] = {f, PyLong_FromUnsignedLongLong(a), PyLong_FromUnsignedLongLong(b),
                         with_c ? PyLong_FromUnsignedLongLong(c) : NULL};
    size_t n = with_c ? 3 : 2;
    PyObject *r = NULL;
    if (args[1] && args[2] && (!with_c || args[3]))
        r = name != NULL ? PyObject_VectorcallMethod(name, args, n + 1, NULL)
                         : PyObject_Vectorcall(f, args + 1, n | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_XDECREF(args[1]);
    Py_XDECREF(args[2]);
    Py_XDECREF(args[3]);
    return r;
}

static PyObject *s_index, *s_mmio_read, *s_mmio_write; /* interned names, made at import */

/* what a bus read returned, as `n` bytes: Python's int.to_bytes(n, "little") rules (a negative
 * value or one that does not fit raises OverflowError), so both loops fail alike */
static int read_result(PyObject *r, unsigned n, uint64_t *out) {
    if (r == NULL)
        return -1;
    if (!PyLong_Check(r)) {
        PyErr_Format(PyExc_TypeError, "a bus read returned %.50s, not an int", Py_TYPE(r)->tp_name);
        Py_DECREF(r);
        return -1;
    }
    int overflow = 0;
    long long sv = PyLong_AsLongLongAndOverflow(r, &overflow);
    uint64_t v = 0;
    if (overflow > 0) {
        v = PyLong_AsUnsignedLongLong(r);
        if (v == (uint64_t)-1 && PyErr_Occurred()) {
            Py_DECREF(r);
            return -1;
        }
    } else if (overflow < 0 || sv < 0) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_OverflowError, "can't convert negative int to unsigned");
        return -1;
    } else {
        v = (uint64_t)sv;
    }
    Py_DECREF(r);
    if (n < 8 && (v >> (8 * n)) != 0) {
        PyErr_SetString(PyExc_OverflowError, "int too big to convert");
        return -1;
    }
    *out = v;
    return 0;
}

/* MmioBus.read/write's lookup: the mapping holding [addr, addr + n), as a new reference to
 * the bus's index (which keeps the mapping alive) and the mapping borrowed from it; *mapping
 * NULL where nobody owns the access. -1 with an exception set where the index is not the
 * bus's shape. */
static int mmio_find(PyObject *bus, uint64_t addr, uint32_t n, PyObject **index, PyObject **mapping,
                     uint64_t *offset) {
    *mapping = NULL;
    *index = PyObject_GetAttr(bus, s_index);
    if (*index == NULL)
        return -1;
    PyObject *starts, *maps;
    if (!PyTuple_CheckExact(*index) || PyTuple_GET_SIZE(*index) != 2 ||
        !PyList_CheckExact(starts = PyTuple_GET_ITEM(*index, 0)) ||
        !PyList_CheckExact(maps = PyTuple_GET_ITEM(*index, 1)) || PyList_GET_SIZE(starts) != PyList_GET_SIZE(maps))
        goto shape;
    Py_ssize_t lo = 0, hi = PyList_GET_SIZE(starts); /* bisect_right(starts, addr) */
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        uint64_t start = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(starts, mid));
        if (start == (uint64_t)-1 && PyErr_Occurred())
            return -1;
        if (addr < start)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (lo == 0)
        return 0;
    PyObject *m = PyList_GET_ITEM(maps, lo - 1);
    if (!PyTuple_Check(m) || PyTuple_GET_SIZE(m) != 5)
        goto shape;
    uint64_t base = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(m, 0));
    uint64_t end = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(m, 4));
    if (PyErr_Occurred())
        return -1;
    if (addr < end && n <= end - addr) {
        *mapping = m;
        *offset = addr - base;
    }
    return 0;
shape:
    PyErr_SetString(PyExc_TypeError, "MmioBus.index holds (starts, mappings) lists");
    return -1;
}

static inline uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

PyDoc_STRVAR(run_doc, "run(fd, run_page, pio_ports, mmio_bus, budget, kvm_run,\n"
                      "exit_io, exit_mmio, stamps) -> (exits, reason, errno): Vcpu._loop's fast path\n"
                      "(see the module's source).");

static PyObject *el_run(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    Py_buffer page, stamp_buf = {0};
    PyObject *pio_ports, *mmio_bus, *stamps;
    unsigned long budget, kvm_run;
    unsigned exit_io, exit_mmio;
    if (!PyArg_ParseTuple(args, "iw*O!OkkIIO", &fd, &page, &PyDict_Type, &pio_ports, &mmio_bus, &budget, &kvm_run,
                          &exit_io, &exit_mmio, &stamps))
        return NULL;
    uint64_t *stamp = NULL;
    size_t room = 0; /* pairs of stamps left */
    if (stamps != Py_None) {
        if (PyObject_GetBuffer(stamps, &stamp_buf, PyBUF_WRITABLE) < 0) {
            PyBuffer_Release(&page);
            return NULL;
        }
        stamp = stamp_buf.buf;
        room = (size_t)stamp_buf.len / (2 * sizeof(uint64_t));
    }
    uint8_t *run = page.buf;
    const uint64_t len = (uint64_t)page.len;
    unsigned long long exits = 0;
    int reason = BUDGET, err = 0;
    /* the last port's int key, kept for the call: a guest hammers one port, and making and
     * freeing the key each exit cost ~10-20 ns of a port exit's ~135-250 ns here (loop alone,
     * a null ioctl in place of KVM_RUN) */
    PyObject *key = NULL;
    unsigned key_port = 0x10000;
    if (len < 64) {
        PyErr_Format(PyExc_ValueError, "a kvm_run page of %lld bytes", (long long)page.len);
        goto fail;
    }
    while (exits < budget) {
        int rc;
        uint64_t entered = room ? now_ns() : 0;
        Py_BEGIN_ALLOW_THREADS;
        rc = ioctl(fd, kvm_run, 0);
        if (rc < 0)
            err = errno;
        Py_END_ALLOW_THREADS;
        if (room) {
            stamp[0] = entered;
            stamp[1] = now_ns();
            stamp += 2;
            room--;
        }
        if (rc < 0) {
            reason = FAILED;
            break;
        }
        exits++;
        uint32_t why;
        memcpy(&why, run + 8, 4);
        if (why == exit_io) {
            const unsigned out = run[32], size = run[33];
            uint16_t port;
            uint32_t count;
            uint64_t off;
            memcpy(&port, run + 34, 2);
            memcpy(&count, run + 36, 4);
            memcpy(&off, run + 40, 8);
            if (size == 0 || size > 8 || off > len || (uint64_t)count * size > len - off) {
                PyErr_Format(PyExc_RuntimeError, "KVM reported I/O outside the run page (%u x %u at %llu)", count,
                             size, (unsigned long long)off);
                goto fail;
            }
            if (port != key_port) {
                Py_XDECREF(key);
                key_port = 0x10000;
                if ((key = PyLong_FromUnsignedLong(port)) == NULL)
                    goto fail;
                key_port = port;
            }
            PyObject *entry = PyDict_GetItemWithError(pio_ports, key); /* borrowed */
            if (entry == NULL && PyErr_Occurred())
                goto fail;
            if (entry == Py_None) /* a sink's port: served as nobody's */
                entry = NULL;
            uint64_t offset = 0;
            if (entry != NULL) {
                if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3) {
                    PyErr_SetString(PyExc_TypeError, "PioBus.ports holds (offset, read, write) tuples");
                    goto fail;
                }
                offset = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(entry, 0));
                if (offset == (uint64_t)-1 && PyErr_Occurred())
                    goto fail;
                Py_INCREF(entry); /* a device call may change the table */
            }
            for (uint32_t i = 0; i < count; i++, off += size) {
                if (entry == NULL) { /* nobody's port: reads all ones, writes dropped */
                    if (!out)
                        store_le(run + off, ~(uint64_t)0, size);
                } else if (out) {
                    PyObject *r = call_ints(NULL, PyTuple_GET_ITEM(entry, 2), offset, size, 1, load_le(run + off, size));
                    if (r == NULL) {
                        Py_DECREF(entry);
                        goto fail;
                    }
                    Py_DECREF(r);
                } else {
                    uint64_t v;
                    if (read_result(call_ints(NULL, PyTuple_GET_ITEM(entry, 1), offset, size, 0, 0), size, &v) < 0) {
                        Py_DECREF(entry);
                        goto fail;
                    }
                    store_le(run + off, v, size);
                }
            }
            Py_XDECREF(entry);
        } else if (why == exit_mmio) {
            uint64_t addr;
            uint32_t n;
            memcpy(&addr, run + 32, 8);
            memcpy(&n, run + 48, 4);
            if (n > 8)
                n = 8;
            PyObject *index, *m;
            uint64_t offset = 0;
            if (mmio_find(mmio_bus, addr, n, &index, &m, &offset) < 0) {
                Py_XDECREF(index);
                goto fail;
            }
            if (m == NULL) { /* nobody's: reads all ones, writes dropped */
                if (!run[52])
                    store_le(run + 40, ~(uint64_t)0, n);
                Py_DECREF(index);
                continue;
            }
            PyObject *device = PyTuple_GET_ITEM(m, 2);
            if (run[52]) {
                PyObject *r = call_ints(s_mmio_write, device, offset, n, 1, load_le(run + 40, n));
                Py_DECREF(index);
                if (r == NULL)
                    goto fail;
                Py_DECREF(r);
            } else {
                uint64_t v;
                int bad = read_result(call_ints(s_mmio_read, device, offset, n, 0, 0), n, &v);
                Py_DECREF(index);
                if (bad < 0)
                    goto fail;
                store_le(run + 40, v, n);
            }
        } else {
            reason = (int)why;
            break;
        }
    }
    Py_XDECREF(key);
    PyBuffer_Release(&page);
    if (stamps != Py_None)
        PyBuffer_Release(&stamp_buf);
    return Py_BuildValue("(Kii)", exits, reason, err);
fail:
    Py_XDECREF(key);
    PyBuffer_Release(&page);
    if (stamps != Py_None)
        PyBuffer_Release(&stamp_buf);
    return NULL;
}

static PyMethodDef methods[] = {
    {"run", el_run, METH_VARARGS, run_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_exitloop",
    .m_doc = "corral's compiled vCPU loop: KVM_RUN and port-I/O/MMIO exit dispatch (see vcpu.py)",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__exitloop(void) {
    s_index = PyUnicode_InternFromString("index");
    s_mmio_read = PyUnicode_InternFromString("mmio_read");
    s_mmio_write = PyUnicode_InternFromString("mmio_write");
    if (!s_index || !s_mmio_read || !s_mmio_write)
        return NULL;
    return PyModule_Create(&module);
}

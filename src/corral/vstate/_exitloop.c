/* corral's compiled vCPU loop: KVM_RUN and the dispatch of port-I/O and MMIO exits, in C.
 *
 * `Vcpu._loop` (vcpu.py) is the reference and does exactly this in Python: enter the guest,
 * and on an I/O exit call the bus's read or write for every item (string I/O repeats it
 * `count` times), on an MMIO exit call the MMIO bus's; every other exit goes back to Python.
 * What this saves is the interpreter's work around those calls on every exit (the loop, the
 * ioctl wrapper, unpacking the run page, building and slicing bytes): the buses and devices
 * stay Python. The GIL is released around KVM_RUN only, as fcntl.ioctl releases it.
 *
 * run(fd, run_page, pio_read, pio_write, mmio_read, mmio_write, budget, kvm_run, exit_io,
 *     exit_mmio, stamps) -> (exits, reason, errno)
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

/* f(a, b) or f(a, b, c) with ints; NULL with an exception set on failure */
static PyObject *call_ints(PyObject *f, uint64_t a, uint64_t b, int with_c, uint64_t c) {
    PyObject *args[3] = {PyLong_FromUnsignedLongLong(a), PyLong_FromUnsignedLongLong(b),
                         with_c ? PyLong_FromUnsignedLongLong(c) : NULL};
    PyObject *r = NULL;
    if (args[0] && args[1] && (!with_c || args[2]))
        r = PyObject_Vectorcall(f, args, with_c ? 3 : 2, NULL);
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    Py_XDECREF(args[2]);
    return r;
}

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

static inline uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

PyDoc_STRVAR(run_doc, "run(fd, run_page, pio_read, pio_write, mmio_read, mmio_write, budget, kvm_run,\n"
                      "exit_io, exit_mmio, stamps) -> (exits, reason, errno): Vcpu._loop's fast path\n"
                      "(see the module's source).");

static PyObject *el_run(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    Py_buffer page, stamp_buf = {0};
    PyObject *pio_read, *pio_write, *mmio_read, *mmio_write, *stamps;
    unsigned long budget, kvm_run;
    unsigned exit_io, exit_mmio;
    if (!PyArg_ParseTuple(args, "iw*OOOOkkIIO", &fd, &page, &pio_read, &pio_write, &mmio_read, &mmio_write,
                          &budget, &kvm_run, &exit_io, &exit_mmio, &stamps))
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
            for (uint32_t i = 0; i < count; i++, off += size) {
                if (out) {
                    PyObject *r = call_ints(pio_write, port, size, 1, load_le(run + off, size));
                    if (r == NULL)
                        goto fail;
                    Py_DECREF(r);
                } else {
                    uint64_t v;
                    if (read_result(call_ints(pio_read, port, size, 0, 0), size, &v) < 0)
                        goto fail;
                    store_le(run + off, v, size);
                }
            }
        } else if (why == exit_mmio) {
            uint64_t addr;
            uint32_t n;
            memcpy(&addr, run + 32, 8);
            memcpy(&n, run + 48, 4);
            if (n > 8)
                n = 8;
            if (run[52]) {
                PyObject *r = call_ints(mmio_write, addr, n, 1, load_le(run + 40, n));
                if (r == NULL)
                    goto fail;
                Py_DECREF(r);
            } else {
                uint64_t v;
                if (read_result(call_ints(mmio_read, addr, n, 0, 0), n, &v) < 0)
                    goto fail;
                store_le(run + 40, v, n);
            }
        } else {
            reason = (int)why;
            break;
        }
    }
    PyBuffer_Release(&page);
    if (stamps != Py_None)
        PyBuffer_Release(&stamp_buf);
    return Py_BuildValue("(Kii)", exits, reason, err);
fail:
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

PyMODINIT_FUNC PyInit__exitloop(void) { return PyModule_Create(&module); }

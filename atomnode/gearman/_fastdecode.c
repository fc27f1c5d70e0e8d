/* atomnode.gearman._fastdecode: the Decoder's fast path (protocol.Decoder.next_events)
 * in C.
 *
 * decode(buf, pos, limit, table, magic, max_size, packet_type, request) -> (packets, pos)
 *
 * From ``pos`` in ``buf`` (bytes or bytearray), turns at most ``limit`` complete binary
 * packets into ``packet_type`` tuples (type, args, request), and returns them with the
 * position after the last one. ``table`` holds 256 bytes: the argument count of each
 * packet type this side accepts, 255 for the others. It takes exactly what the Python
 * loop after it takes (a packet of an accepted type, with ``magic``, at most
 * ``max_size`` bytes, whose arguments split as they should) and stops, without an error,
 * at anything else: text, a partial packet, a bad magic or type, a wrong argument count.
 * The Python loop goes on from there and its checked path decides and explains; so this
 * file holds no error message of the protocol, and tests/test_protocol.py compares the
 * two paths on random and hostile streams.
 *
 * Every read is bounded by the buffer's length: a header only when 12 bytes are there, a
 * payload only when all of it is, a NUL searched for only inside the payload. In a hot
 * loop it decodes a serial round trip's packets in 1.8 us against 6.3 us for the
 * mypyc-compiled loop (docs/performance.md, round 6).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *
decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 8) { PyErr_SetString(PyExc_TypeError, "decode takes 8 arguments"); return NULL; }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t n = view.len;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    const char *table; Py_ssize_t tlen;
    if (PyBytes_AsStringAndSize(args[3], (char **)&table, &tlen) < 0) goto fail;
    unsigned long magic_ok = PyLong_AsUnsignedLong(args[4]);
    Py_ssize_t max_size = PyLong_AsSsize_t(args[5]);
    PyObject *request = args[7];
    if (PyErr_Occurred()) goto fail;
    if (!PyType_Check(args[6]) || !PyType_IsSubtype((PyTypeObject *)args[6], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "packet_type must be a subclass of tuple");
        goto fail;
    }
    PyTypeObject *ptype = (PyTypeObject *)args[6];
    if (pos < 0 || pos > n) { PyErr_SetString(PyExc_ValueError, "bad pos"); goto fail; }
    PyObject *out = PyList_New(0);
    if (!out) goto fail;
    while (limit > 0 && n - pos >= 12 && buf[pos] == 0) {
        const unsigned char *h = buf + pos;
        unsigned long magic = ((unsigned long)h[0] << 24) | ((unsigned long)h[1] << 16) | ((unsigned long)h[2] << 8) | h[3];
        unsigned long type = ((unsigned long)h[4] << 24) | ((unsigned long)h[5] << 16) | ((unsigned long)h[6] << 8) | h[7];
        unsigned long size = ((unsigned long)h[8] << 24) | ((unsigned long)h[9] << 16) | ((unsigned long)h[10] << 8) | h[11];
        if (magic != magic_ok || type >= (unsigned long)tlen || (unsigned char)table[type] == 255
            || (Py_ssize_t)size > max_size)
            break;
        int na = (unsigned char)table[type];
        Py_ssize_t start = pos + 12;
        if (n - start < (Py_ssize_t)size) break;  /* partial */
        Py_ssize_t end = start + (Py_ssize_t)size;
        PyObject *argt;
        if (na == 0) {
            if (size) break;
            argt = PyTuple_New(0);
        } else {
            argt = PyTuple_New(na);
            if (!argt) goto fail_out;
            const unsigned char *p = buf + start, *e = buf + end;
            int i;
            for (i = 0; i < na - 1; i++) {
                const unsigned char *z = memchr(p, 0, (size_t)(e - p));
                if (!z) break;
                PyObject *a = PyBytes_FromStringAndSize((const char *)p, z - p);
                if (!a) { Py_DECREF(argt); goto fail_out; }
                PyTuple_SET_ITEM(argt, i, a);
                p = z + 1;
            }
            if (i < na - 1) { Py_DECREF(argt); break; }  /* too few arguments: the checked path explains */
            PyObject *a = PyBytes_FromStringAndSize((const char *)p, e - p);
            if (!a) { Py_DECREF(argt); goto fail_out; }
            PyTuple_SET_ITEM(argt, na - 1, a);
        }
        if (!argt) goto fail_out;
        PyObject *pk = ptype->tp_alloc(ptype, 3);
        if (!pk) { Py_DECREF(argt); goto fail_out; }
        PyObject *t = PyLong_FromUnsignedLong(type);
        if (!t) { Py_DECREF(argt); Py_DECREF(pk); goto fail_out; }
        Py_INCREF(request);
        PyTuple_SET_ITEM(pk, 0, t);
        PyTuple_SET_ITEM(pk, 1, argt);
        PyTuple_SET_ITEM(pk, 2, request);
        if (PyList_Append(out, pk) < 0) { Py_DECREF(pk); goto fail_out; }
        Py_DECREF(pk);
        pos = end;
        limit--;
    }
    PyBuffer_Release(&view);
    PyObject *r = Py_BuildValue("(Nn)", out, pos);
    return r;
fail_out:
    Py_DECREF(out);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL}
};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_fastdecode", NULL, -1, methods,
                                  NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__fastdecode(void) { return PyModule_Create(&mod); }

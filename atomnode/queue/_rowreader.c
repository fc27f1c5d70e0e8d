/* atomnode.queue._rowreader: read a query's rows straight from SQLite, for recovery.

A restart after a crash reads every live job (a million rows is the restart budget's
case) before the daemon serves. Python's sqlite3 module spends most of that time in its
own per-column work (it releases and retakes the GIL around each column's type check, and
each call takes the connection's mutex): about 1.8 us of a 2.6 us row. This reader opens
its own connection to the same file, without per-call mutexes (NOMUTEX: the connection
never leaves the call), and works in batches: it steps SQLite through a batch of rows
with the GIL released, copying their values into a buffer of its own, then takes the GIL
once to build the batch's tuples. Another thread (the daemon's, restoring the previous
batch into the broker) runs meanwhile.

    read_rows(path, sql, busy_timeout_ms, share) -> list of tuples
    read_batches(path, sql, busy_timeout_ms, share, batch_rows, deliver) -> rows read
        deliver(list of tuples) is called for each batch, in the calling thread, in order

Values come back as Python's sqlite3 returns them with ``text_factory = bytes``: INTEGER
as int, REAL as float, NULL as None, and TEXT and BLOB both as bytes (the store wants
bytes whatever type a value was stored with). ``share`` is a column index (or -1): a value
of that column equal to the previous row's is returned as the same bytes object, so a
million rows of a few function names hold a few name objects, not a million.

Errors raise sqlite3.DatabaseError (sqlite3.OperationalError for a busy, locked or
unopenable file) with SQLite's message; an exception raised by ``deliver`` stops the read
and is raised as is. Batches delivered before an error stay delivered: the caller decides
(recovery refuses the start). The statement must be read-only (refused before it runs).
Recovery falls back to the sqlite3 module where this extension was not built (setup.py:
no compiler, or ATOMNODE_PURE_PYTHON=1); the results are the same (tests/test_rowreader.py).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sqlite3.h>

static PyObject *database_error;     /* sqlite3.DatabaseError */
static PyObject *operational_error;  /* sqlite3.OperationalError */

static PyObject *fail(sqlite3 *db, int rc, const char *what) {
    PyObject *type = (rc == SQLITE_BUSY || rc == SQLITE_LOCKED || rc == SQLITE_CANTOPEN)
                         ? operational_error : database_error;
    const char *msg = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    PyErr_Format(type, "%s: %s", what, msg);
    return NULL;
}

/* A value copied out of SQLite while the GIL is released. */
typedef struct {
    int type;
    sqlite3_int64 i;
    double d;
    size_t off, len; /* TEXT or BLOB: its bytes in batch.bytes */
} cell;

typedef struct {
    cell *cells; /* rows x ncol */
    char *bytes;
    size_t bytes_len, bytes_cap;
    int rows;
} batch;

/* Without the GIL: step up to max_rows rows into b. Returns the last step's result code:
   SQLITE_ROW when the batch is full (more may follow), SQLITE_DONE at the end, else an
   error (SQLITE_NOMEM if a copy could not be made). */
static int fill(sqlite3_stmt *st, int ncol, batch *b, int max_rows) {
    b->rows = 0;
    b->bytes_len = 0;
    while (b->rows < max_rows) {
        int rc = sqlite3_step(st);
        if (rc != SQLITE_ROW)
            return rc;
        cell *c = b->cells + (size_t)b->rows * (size_t)ncol;
        for (int i = 0; i < ncol; i++, c++) {
            c->type = sqlite3_column_type(st, i);
            switch (c->type) {
            case SQLITE_INTEGER:
                c->i = sqlite3_column_int64(st, i);
                break;
            case SQLITE_FLOAT:
                c->d = sqlite3_column_double(st, i);
                break;
            case SQLITE_NULL:
                break;
            default: {
                const void *p = sqlite3_column_blob(st, i);
                size_t n = (size_t)sqlite3_column_bytes(st, i);
                if (b->bytes_len + n > b->bytes_cap) {
                    size_t cap = b->bytes_cap ? b->bytes_cap : 65536;
                    while (cap < b->bytes_len + n)
                        cap *= 2;
                    char *grown = realloc(b->bytes, cap);
                    if (grown == NULL)
                        return SQLITE_NOMEM;
                    b->bytes = grown;
                    b->bytes_cap = cap;
                }
                if (n)
                    memcpy(b->bytes + b->bytes_len, p, n);
                c->off = b->bytes_len;
                c->len = n;
                b->bytes_len += n;
            }
            }
        }
        b->rows++;
    }
    return SQLITE_ROW;
}

/* With the GIL: the batch's rows as a list of tuples. */
static PyObject *build(const batch *b, int ncol, int share, PyObject **shared) {
    PyObject *rows = PyList_New(b->rows);
    if (rows == NULL)
        return NULL;
    const cell *c = b->cells;
    for (int r = 0; r < b->rows; r++) {
        PyObject *row = PyTuple_New(ncol);
        if (row == NULL)
            goto error;
        PyList_SET_ITEM(rows, r, row);
        for (int i = 0; i < ncol; i++, c++) {
            PyObject *v;
            switch (c->type) {
            case SQLITE_INTEGER:
                v = PyLong_FromLongLong(c->i);
                break;
            case SQLITE_FLOAT:
                v = PyFloat_FromDouble(c->d);
                break;
            case SQLITE_NULL:
                v = Py_None;
                Py_INCREF(v);
                break;
            default: {
                const char *p = b->bytes + c->off;
                Py_ssize_t n = (Py_ssize_t)c->len;
                if (i == share && *shared != NULL && PyBytes_GET_SIZE(*shared) == n &&
                    (n == 0 || memcmp(PyBytes_AS_STRING(*shared), p, (size_t)n) == 0)) {
                    v = *shared;
                    Py_INCREF(v);
                } else {
                    v = PyBytes_FromStringAndSize(p, n);
                    if (v != NULL && i == share) {
                        Py_XDECREF(*shared);
                        Py_INCREF(v);
                        *shared = v;
                    }
                }
            }
            }
            if (v == NULL)
                goto error;
            PyTuple_SET_ITEM(row, i, v);
        }
    }
    return rows;
error:
    Py_DECREF(rows);
    return NULL;
}

/* The read: batches go to deliver(list), or, if deliver is NULL, are appended to *all.
   Returns the number of rows read, or -1 with an exception set. */
static Py_ssize_t run(const char *path, const char *sql, int busy_ms, int share,
                      int batch_rows, PyObject *deliver, PyObject *all) {
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    PyObject *shared = NULL;
    batch b = {NULL, NULL, 0, 0, 0};
    Py_ssize_t total = -1, count = 0;
    int rc, opened;

    Py_BEGIN_ALLOW_THREADS
    rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    opened = rc == SQLITE_OK;
    if (opened) {
        sqlite3_busy_timeout(db, busy_ms);
        rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
    }
    Py_END_ALLOW_THREADS
    if (rc != SQLITE_OK) {
        fail(db, rc, opened ? "cannot read" : "cannot open");
        goto done;
    }
    if (st == NULL || !sqlite3_stmt_readonly(st)) {
        PyErr_SetString(PyExc_ValueError, "the reader runs one read-only statement");
        goto done;
    }
    int ncol = sqlite3_column_count(st);
    if (share >= ncol)
        share = -1;
    if (batch_rows < 1)
        batch_rows = 1;
    b.cells = PyMem_RawMalloc(sizeof(cell) * (size_t)batch_rows * (size_t)(ncol ? ncol : 1));
    if (b.cells == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = fill(st, ncol, &b, batch_rows);
        Py_END_ALLOW_THREADS
        if (rc == SQLITE_NOMEM && b.rows < batch_rows) {
            PyErr_NoMemory();
            goto done;
        }
        if (b.rows) {
            PyObject *rows = build(&b, ncol, share, &shared);
            if (rows == NULL)
                goto done;
            int ok;
            if (deliver != NULL) {
                PyObject *r = PyObject_CallOneArg(deliver, rows);
                ok = r != NULL;
                Py_XDECREF(r);
            } else {
                Py_ssize_t n = PyList_GET_SIZE(all);
                ok = PyList_SetSlice(all, n, n, rows) == 0;
            }
            Py_DECREF(rows);
            if (!ok)
                goto done;
            count += b.rows;
        }
        if (rc != SQLITE_ROW)
            break;
    }
    if (rc != SQLITE_DONE) {
        fail(db, rc, "cannot read");
        goto done;
    }
    total = count;
done:
    Py_XDECREF(shared);
    PyMem_RawFree(b.cells);
    free(b.bytes);
    Py_BEGIN_ALLOW_THREADS
    sqlite3_finalize(st);
    sqlite3_close(db);
    Py_END_ALLOW_THREADS
    return total;
}

static PyObject *read_rows(PyObject *self, PyObject *args) {
    (void)self;
    const char *path, *sql;
    int busy_ms, share;
    if (!PyArg_ParseTuple(args, "ssii:read_rows", &path, &sql, &busy_ms, &share))
        return NULL;
    PyObject *all = PyList_New(0);
    if (all == NULL)
        return NULL;
    if (run(path, sql, busy_ms, share, 4096, NULL, all) < 0) {
        Py_DECREF(all);
        return NULL;
    }
    return all;
}

static PyObject *read_batches(PyObject *self, PyObject *args) {
    (void)self;
    const char *path, *sql;
    int busy_ms, share, batch_rows;
    PyObject *deliver;
    if (!PyArg_ParseTuple(args, "ssiiiO:read_batches", &path, &sql, &busy_ms, &share,
                          &batch_rows, &deliver))
        return NULL;
    if (!PyCallable_Check(deliver)) {
        PyErr_SetString(PyExc_TypeError, "deliver must be callable");
        return NULL;
    }
    Py_ssize_t n = run(path, sql, busy_ms, share, batch_rows, deliver, NULL);
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

static PyMethodDef methods[] = {
    {"read_rows", read_rows, METH_VARARGS,
     "read_rows(path, sql, busy_timeout_ms, share) -> list of row tuples (see the module)."},
    {"read_batches", read_batches, METH_VARARGS,
     "read_batches(path, sql, busy_timeout_ms, share, batch_rows, deliver) -> rows read."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "atomnode.queue._rowreader",
    "Fast read of a query's rows from SQLite, for recovery.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rowreader(void) {
    PyObject *sqlite3_module = PyImport_ImportModule("sqlite3");
    if (sqlite3_module == NULL)
        return NULL;
    database_error = PyObject_GetAttrString(sqlite3_module, "DatabaseError");
    operational_error = PyObject_GetAttrString(sqlite3_module, "OperationalError");
    Py_DECREF(sqlite3_module);
    if (database_error == NULL || operational_error == NULL)
        return NULL;
    return PyModule_Create(&module);
}

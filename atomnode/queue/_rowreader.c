/* atomnode.queue._rowreader: read a query's rows straight from SQLite, for recovery.

A restart after a crash reads every live job (a million rows is the restart budget's
case) before the daemon serves. Python's sqlite3 module spends most of that time in its
own per-column work (it releases and retakes the GIL around each column's type check, and
each call takes the connection's mutex): about 1.8 us of a 2.6 us row. This reader opens
its own connection to the same file, without per-call mutexes (NOMUTEX: the connection
never leaves this function), steps the statement with the GIL released (so a helper
thread can run SQLite beside it), and builds each row's tuple directly.

    read_rows(path, sql, busy_timeout_ms, share) -> list of tuples

Values come back as Python's sqlite3 returns them with ``text_factory = bytes``: INTEGER
as int, REAL as float, NULL as None, and TEXT and BLOB both as bytes (the store wants
bytes whatever type a value was stored with). ``share`` is a column index (or -1): a value
of that column equal to the previous row's is returned as the same bytes object, so a
million rows of a few function names hold a few name objects, not a million.

Errors raise sqlite3.DatabaseError (sqlite3.OperationalError for a busy or locked file)
with SQLite's message, as the sqlite3 module would. The connection is read-only in
effect: the statement must be a SELECT (anything else is refused before it runs).
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

static PyObject *column_value(sqlite3_stmt *st, int i, PyObject **shared) {
    switch (sqlite3_column_type(st, i)) {
    case SQLITE_INTEGER:
        return PyLong_FromLongLong(sqlite3_column_int64(st, i));
    case SQLITE_FLOAT:
        return PyFloat_FromDouble(sqlite3_column_double(st, i));
    case SQLITE_NULL:
        Py_RETURN_NONE;
    default: { /* TEXT or BLOB: the stored bytes */
        const void *p = sqlite3_column_blob(st, i);
        Py_ssize_t n = sqlite3_column_bytes(st, i);
        if (shared != NULL) {
            if (*shared != NULL && PyBytes_GET_SIZE(*shared) == n &&
                (n == 0 || memcmp(PyBytes_AS_STRING(*shared), p, (size_t)n) == 0)) {
                Py_INCREF(*shared);
                return *shared;
            }
            PyObject *v = PyBytes_FromStringAndSize(p, n);
            if (v != NULL) {
                Py_XDECREF(*shared);
                Py_INCREF(v);
                *shared = v;
            }
            return v;
        }
        return PyBytes_FromStringAndSize(p, n);
    }
    }
}

static PyObject *read_rows(PyObject *self, PyObject *args) {
    (void)self;
    const char *path, *sql;
    int busy_ms, share;
    if (!PyArg_ParseTuple(args, "ssii:read_rows", &path, &sql, &busy_ms, &share))
        return NULL;
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    PyObject *rows = NULL, *shared = NULL;
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
    if (!sqlite3_stmt_readonly(st)) {
        PyErr_SetString(PyExc_ValueError, "read_rows runs read-only statements only");
        goto done;
    }
    int ncol = sqlite3_column_count(st);
    if (share >= ncol)
        share = -1;
    rows = PyList_New(0);
    if (rows == NULL)
        goto done;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = sqlite3_step(st);
        Py_END_ALLOW_THREADS
        if (rc != SQLITE_ROW)
            break;
        PyObject *row = PyTuple_New(ncol);
        if (row == NULL)
            goto error;
        for (int i = 0; i < ncol; i++) {
            PyObject *v = column_value(st, i, i == share ? &shared : NULL);
            if (v == NULL) {
                Py_DECREF(row);
                goto error;
            }
            PyTuple_SET_ITEM(row, i, v);
        }
        int appended = PyList_Append(rows, row);
        Py_DECREF(row);
        if (appended < 0)
            goto error;
    }
    if (rc != SQLITE_DONE) {
        fail(db, rc, "cannot read");
        goto error;
    }
    goto done;
error:
    Py_CLEAR(rows);
done:
    Py_XDECREF(shared);
    Py_BEGIN_ALLOW_THREADS
    sqlite3_finalize(st);
    sqlite3_close(db);
    Py_END_ALLOW_THREADS
    return rows;
}

static PyMethodDef methods[] = {
    {"read_rows", read_rows, METH_VARARGS,
     "read_rows(path, sql, busy_timeout_ms, share) -> list of row tuples (see the module)."},
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

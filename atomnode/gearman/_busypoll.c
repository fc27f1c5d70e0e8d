/* atomnode.gearman._busypoll: the hub's busy poll (server.Server._hub, config busy_poll).
 *
 * spin(epfd, seconds) -> bool
 *
 * Polls the epoll set ``epfd`` without sleeping (epoll_wait with a zero timeout) until
 * one of its descriptors is ready, then returns True, or until ``seconds`` have passed,
 * then returns False. An error of epoll_wait (EINTR: a signal) returns True too: the
 * caller's own poll then sees what there is. It reads no event: the set is
 * level-triggered, so whatever is ready stays ready for the caller's poll.
 *
 * Why in C: the whole spin runs without the GIL. A loop in Python would take the GIL back
 * after each poll, and the daemon's other threads (the store's writer above all, whose
 * commits acknowledge durable jobs) would wait for it until the spin ended: CPython's GIL
 * goes to a waiting thread only when its holder lets go for longer than a moment.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sys/epoll.h>
#include <time.h>

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static PyObject *
spin(PyObject *self, PyObject *args)
{
    (void)self;
    int epfd;
    double seconds;
    if (!PyArg_ParseTuple(args, "id:spin", &epfd, &seconds))
        return NULL;
    int n;
    Py_BEGIN_ALLOW_THREADS
    double end = now() + seconds;
    struct epoll_event ev;
    for (;;) {
        n = epoll_wait(epfd, &ev, 1, 0);
        if (n != 0 || now() >= end)
            break;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();  /* a spin-wait hint to the CPU (and its sibling thread) */
#endif
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(n != 0);
}

static PyMethodDef methods[] = {
    {"spin", spin, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL}
};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_busypoll", NULL, -1, methods,
                                  NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__busypoll(void) { return PyModule_Create(&mod); }

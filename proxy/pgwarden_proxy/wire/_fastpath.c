/* The fast path: executions of an already prepared statement, relayed without Python work
 * per message.
 *
 * Drivers run most statements as Bind, Describe (portal), Execute, Sync of a statement they
 * prepared once (libpq's PQexecPrepared, pgbench -M prepared, JDBC, asyncpg). When the session's
 * policy lets such a statement run as it is (allowed; nothing to hold, mask or record), its
 * decision was taken at Parse, and each execution only needs bookkeeping: which statement, its
 * parameters, when it started, its rows and its command tag. FastPath keeps that bookkeeping
 * for whole client reads made only of such messages, and for the server's answers to them.
 * Anything else goes to the Python session (session.py), which stays the reference: a read
 * with any other message or an unregistered statement is refused whole (client() returns -1,
 * nothing changed), and on the server side the walk stops at the first message it does not
 * expect (an error, a notice, a setting, a message cut by the end of the read) so that the
 * session takes the queue over (take()) and goes on from there.
 *
 * FastPath(limit)
 *   limit: the largest whole message (limits.maxMessageBytes).
 * register(name: bytes, entry) / unregister(name) / clear()
 *   the statements whose executions may take this path; `entry` is opaque here and comes back
 *   in the events.
 * client(data) -> int
 *   data: complete frontend messages. Accepted when they are all Bind (unnamed portal, of a
 *   registered statement), Describe of that portal directly before its Execute, Execute (of the
 *   portal bound before it in the same read, all rows), Sync or Flush: queues them and returns
 *   how many Executes there were. Otherwise -1, and nothing is queued.
 * server(data) -> (end, done, status)
 *   walks the backend messages that answer the queue, from the start of data: data[:end] is
 *   to be forwarded as it is; done lists the finished statements as
 *   (entry, params, bind, start, duration_ms, rows, bytes, tag); status is the transaction
 *   status byte of the last ReadyForQuery (bytes) or None.
 * take() -> list
 *   empties the queue, oldest first: (kind,) for Bind, Describe and Sync (the message type
 *   byte as an int), (69, entry, params, bind, start, t0, rows, bytes) for an Execute, where
 *   t0 is on time.perf_counter's clock.
 * take_bind() -> bytes | None
 *   the body of the last Bind this path relayed (the unnamed portal may be executed again by
 *   a later message the session handles), once.
 * fresh() -> list of (entry, params, bind, start)
 *   the Executes queued by the last client() that took its read (to record them before the
 *   read goes upstream); note(notes) then gives each of them, in order, an object of the
 *   session's (its event), which comes back as the last member of its done and take() tuples
 *   (None when not noted).
 * active: the queue is not empty.
 *
 * params is the list of parameters as text when they were sent as text, or None: the session
 * then renders them from bind (the Bind body) and the statement's parameter types.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define SMALL_MESSAGE_LIMIT 10000 /* framing.SMALL_MESSAGE_LIMIT: Describe, Execute, Sync, Flush */
#define STREAM_LIMIT ((1 << 30) + 64) /* framing.STREAM_LIMIT: a DataRow */

typedef struct {
    int kind;         /* 'B', 'D', 'E', 'S' */
    PyObject *entry;  /* E: the registered statement */
    PyObject *params; /* E: list of str | None, or None */
    PyObject *bind;   /* E: the Bind body */
    double start;     /* E: epoch seconds */
    double t0;        /* E: CLOCK_MONOTONIC seconds, when queued */
    long long rows, bytes;
    PyObject *note; /* E: the session's, see note() */
} Item;

typedef struct {
    PyObject_HEAD
    PyObject *registry; /* bytes name -> entry */
    Py_ssize_t limit;
    Item *q;
    Py_ssize_t head, len, cap; /* the queue is q[head:len] */
    Py_ssize_t fresh_from, fresh_to; /* what the last client() queued (items never move
                                        between two client() calls) */
    PyObject *last_bind;
    PyObject *cache_name, *cache_entry; /* the last name looked up, and what it gave */
} FastPath;

static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline int16_t be16(const unsigned char *p) {
    return (int16_t)(((uint16_t)p[0] << 8) | (uint16_t)p[1]);
}

static double clock_seconds(clockid_t which) {
    struct timespec ts;
    clock_gettime(which, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void item_clear(Item *it) {
    Py_CLEAR(it->entry);
    Py_CLEAR(it->params);
    Py_CLEAR(it->bind);
    Py_CLEAR(it->note);
}

static void forget_cache(FastPath *self) {
    Py_CLEAR(self->cache_name);
    Py_CLEAR(self->cache_entry);
}

static void queue_clear(FastPath *self) {
    for (Py_ssize_t i = self->head; i < self->len; i++)
        item_clear(&self->q[i]);
    self->head = self->len = self->fresh_from = self->fresh_to = 0;
}

/* Room for `extra` more items at the end. Items never move while a read is queued (client()
 * rolls back to an index); compact() moves them, between reads. */
static int queue_reserve(FastPath *self, Py_ssize_t extra) {
    if (self->len + extra <= self->cap)
        return 0;
    Py_ssize_t cap = self->cap ? self->cap : 16;
    while (cap < self->len + extra)
        cap *= 2;
    Item *q = PyMem_Realloc(self->q, (size_t)cap * sizeof(Item));
    if (q == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->q = q;
    self->cap = cap;
    return 0;
}

static void queue_compact(FastPath *self) {
    self->fresh_from = self->fresh_to = 0;
    if (self->head == 0)
        return;
    memmove(self->q, self->q + self->head, (size_t)(self->len - self->head) * sizeof(Item));
    self->len -= self->head;
    self->head = 0;
}

/* The entry registered under the name at p (n bytes), borrowed; NULL (no error set) if none. */
static PyObject *lookup(FastPath *self, const char *p, Py_ssize_t n) {
    PyObject *name = self->cache_name;
    if (name != NULL && PyBytes_GET_SIZE(name) == n && memcmp(PyBytes_AS_STRING(name), p, (size_t)n) == 0)
        return self->cache_entry;
    name = PyBytes_FromStringAndSize(p, n);
    if (name == NULL)
        return NULL;
    PyObject *entry = PyDict_GetItemWithError(self->registry, name);
    if (entry == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    Py_INCREF(entry);
    Py_XSETREF(self->cache_name, name);
    Py_XSETREF(self->cache_entry, entry);
    return entry;
}

/* The parameters of a Bind body as a list of str | None when all are text; Py_None when some
 * are binary; NULL (no error set) when the body is not a well-formed Bind up to its values. */
static PyObject *bind_params(const unsigned char *b, Py_ssize_t n, Py_ssize_t pos) {
    if (pos + 2 > n)
        return NULL;
    int16_t nformats = be16(b + pos);
    pos += 2;
    if (nformats < 0 || pos + 2 * (Py_ssize_t)nformats > n)
        return NULL;
    int text = nformats == 0 || (nformats == 1 && be16(b + pos) == 0);
    pos += 2 * (Py_ssize_t)nformats;
    if (pos + 2 > n)
        return NULL;
    int16_t nparams = be16(b + pos);
    pos += 2;
    if (nparams < 0)
        return NULL;
    PyObject *out = text ? PyList_New(nparams) : NULL;
    if (text && out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < nparams; i++) {
        if (pos + 4 > n)
            goto bad;
        int32_t size = (int32_t)be32(b + pos);
        pos += 4;
        if (size == -1) {
            if (out != NULL)
                PyList_SET_ITEM(out, i, Py_NewRef(Py_None));
            continue;
        }
        if (size < 0 || pos + size > n)
            goto bad;
        if (out != NULL) {
            PyObject *v = PyUnicode_DecodeUTF8((const char *)b + pos, size, "replace");
            if (v == NULL)
                goto bad;
            PyList_SET_ITEM(out, i, v);
        }
        pos += size;
    }
    return out != NULL ? out : Py_NewRef(Py_None);
bad:
    Py_XDECREF(out);
    return NULL;
}

static PyObject *FastPath_client(FastPath *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *d = view.buf;
    Py_ssize_t n = view.len, pos = 0, executes = 0;
    Py_ssize_t first; /* rolled back to here when the read is refused */
    PyObject *entry = NULL, *params = NULL, *bind = NULL; /* the bound portal (owned) */
    PyObject *result; /* of a refused read (-1), or NULL on error */
    int described = 0;
    double now = 0.0, mono = 0.0;
    queue_compact(self);
    first = self->len;
    while (pos < n) {
        if (n - pos < 5)
            goto refuse;
        int type = d[pos];
        uint32_t length = be32(d + pos + 1);
        Py_ssize_t limit = type == 'B' ? self->limit : SMALL_MESSAGE_LIMIT;
        if (length < 4 || (Py_ssize_t)length > limit || (Py_ssize_t)length > n - pos - 1)
            goto refuse;
        const unsigned char *b = d + pos + 5;
        Py_ssize_t blen = (Py_ssize_t)length - 4;
        pos += 1 + (Py_ssize_t)length;
        if (described && type != 'E')
            goto refuse; /* Describe portal is only taken right before its Execute */
        int kind = type;
        switch (type) {
        case 'B': {
            if (blen < 1 || b[0] != 0) /* a named portal */
                goto refuse;
            const unsigned char *nul = memchr(b + 1, 0, (size_t)(blen - 1));
            if (nul == NULL)
                goto refuse;
            PyObject *found = lookup(self, (const char *)b + 1, nul - b - 1);
            if (found == NULL) {
                if (PyErr_Occurred())
                    goto error;
                goto refuse;
            }
            PyObject *p = bind_params(b, blen, nul - b + 1);
            if (p == NULL) {
                if (PyErr_Occurred())
                    goto error;
                goto refuse;
            }
            PyObject *body = PyBytes_FromStringAndSize((const char *)b, blen);
            if (body == NULL) {
                Py_DECREF(p);
                goto error;
            }
            Py_XSETREF(entry, Py_NewRef(found));
            Py_XSETREF(params, p);
            Py_XSETREF(bind, body);
            break;
        }
        case 'D':
            if (blen != 2 || b[0] != 'P' || b[1] != 0 || entry == NULL)
                goto refuse;
            described = 1;
            break;
        case 'E':
            if (blen != 5 || b[0] != 0 || be32(b + 1) != 0 || entry == NULL)
                goto refuse; /* another portal, a row limit, or no Bind before it */
            described = 0;
            break;
        case 'S':
        case 'H':
            if (blen != 0)
                goto refuse;
            break;
        default:
            goto refuse;
        }
        if (type == 'H')
            continue;
        if (queue_reserve(self, 1) < 0)
            goto error;
        Item *it = &self->q[self->len++];
        memset(it, 0, sizeof(Item));
        it->kind = kind;
        if (type == 'E') {
            if (executes == 0) {
                now = clock_seconds(CLOCK_REALTIME);
                mono = clock_seconds(CLOCK_MONOTONIC);
            }
            executes++;
            it->entry = entry; /* the portal is used up: its references move to the item */
            it->params = params;
            it->bind = Py_NewRef(bind); /* kept for take_bind() too */
            it->start = now;
            it->t0 = mono;
            entry = params = NULL;
        }
    }
    if (described)
        goto refuse;
    self->fresh_from = first;
    self->fresh_to = self->len;
    PyBuffer_Release(&view);
    Py_XDECREF(entry);
    Py_XDECREF(params);
    if (bind != NULL)
        Py_XSETREF(self->last_bind, bind);
    return PyLong_FromSsize_t(executes);
refuse:
    result = PyLong_FromLong(-1);
    goto undo;
error:
    result = NULL;
undo: /* nothing of this read stays queued */
    for (Py_ssize_t i = first; i < self->len; i++)
        item_clear(&self->q[i]);
    self->len = first;
    PyBuffer_Release(&view);
    Py_XDECREF(entry);
    Py_XDECREF(params);
    Py_XDECREF(bind);
    return result;
}

static PyObject *FastPath_server(FastPath *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *d = view.buf;
    Py_ssize_t n = view.len, pos = 0;
    PyObject *done = NULL;
    int status = 0;
    double mono = 0.0;
    while (self->head < self->len && n - pos >= 5) {
        int type = d[pos];
        uint32_t length = be32(d + pos + 1);
        Py_ssize_t limit = type == 'D' ? STREAM_LIMIT : self->limit;
        if (length < 4 || (Py_ssize_t)length > limit || (Py_ssize_t)length > n - pos - 1)
            break; /* the session reports a bad length, and carries a cut message over */
        Item *it = &self->q[self->head];
        const unsigned char *b = d + pos + 5;
        Py_ssize_t blen = (Py_ssize_t)length - 4;
        switch (type) {
        case '2': /* BindComplete */
            if (it->kind != 'B')
                goto stop;
            break;
        case 'T': /* RowDescription */
        case 'n': /* NoData */
            if (it->kind != 'D')
                goto stop;
            break;
        case 'D': /* DataRow */
            if (it->kind != 'E')
                goto stop;
            it->rows++;
            it->bytes += 1 + (long long)length;
            pos += 1 + (Py_ssize_t)length;
            continue;
        case 'C': { /* CommandComplete */
            if (it->kind != 'E' || blen < 1 || b[blen - 1] != 0)
                goto stop;
            if (mono == 0.0)
                mono = clock_seconds(CLOCK_MONOTONIC);
            PyObject *tag = PyUnicode_DecodeUTF8((const char *)b, blen - 1, "replace");
            if (tag == NULL)
                goto error;
            PyObject *ev = Py_BuildValue("(OOOddLLNO)", it->entry,
                                         it->params ? it->params : Py_None, it->bind, it->start,
                                         (mono - it->t0) * 1000.0, it->rows, it->bytes, tag,
                                         it->note ? it->note : Py_None);
            if (ev == NULL)
                goto error;
            if (done == NULL && (done = PyList_New(0)) == NULL) {
                Py_DECREF(ev);
                goto error;
            }
            int failed = PyList_Append(done, ev);
            Py_DECREF(ev);
            if (failed)
                goto error;
            break;
        }
        case 'Z': /* ReadyForQuery */
            if (it->kind != 'S' || blen != 1)
                goto stop;
            status = b[0];
            break;
        default:
            goto stop;
        }
        item_clear(it);
        self->head++;
        pos += 1 + (Py_ssize_t)length;
    }
stop:
    if (self->head == self->len)
        self->head = self->len = self->fresh_from = self->fresh_to = 0;
    PyBuffer_Release(&view);
    if (done == NULL)
        done = Py_NewRef(Py_None);
    if (status) {
        char s = (char)status;
        return Py_BuildValue("(nNy#)", pos, done, &s, (Py_ssize_t)1);
    }
    return Py_BuildValue("(nNO)", pos, done, Py_None);
error:
    PyBuffer_Release(&view);
    Py_XDECREF(done);
    return NULL;
}

static PyObject *FastPath_take(FastPath *self, PyObject *unused) {
    (void)unused;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = self->head; i < self->len; i++) {
        Item *it = &self->q[i];
        PyObject *t;
        if (it->kind == 'E')
            t = Py_BuildValue("(iOOOddLLO)", it->kind, it->entry,
                              it->params ? it->params : Py_None, it->bind, it->start, it->t0,
                              it->rows, it->bytes, it->note ? it->note : Py_None);
        else
            t = Py_BuildValue("(i)", it->kind);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    queue_clear(self);
    return out;
}

static PyObject *FastPath_fresh(FastPath *self, PyObject *unused) {
    (void)unused;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t from = self->fresh_from > self->head ? self->fresh_from : self->head;
    for (Py_ssize_t i = from; i < self->fresh_to && i < self->len; i++) {
        Item *it = &self->q[i];
        if (it->kind != 'E')
            continue;
        PyObject *t = Py_BuildValue("(OOOd)", it->entry, it->params ? it->params : Py_None,
                                    it->bind, it->start);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}

static PyObject *FastPath_note(FastPath *self, PyObject *notes) {
    if (!PyList_Check(notes)) {
        PyErr_SetString(PyExc_TypeError, "note(notes: list)");
        return NULL;
    }
    Py_ssize_t from = self->fresh_from > self->head ? self->fresh_from : self->head;
    Py_ssize_t k = 0, n = PyList_GET_SIZE(notes);
    for (Py_ssize_t i = from; i < self->fresh_to && i < self->len; i++)
        k += self->q[i].kind == 'E';
    if (k != n) {
        PyErr_Format(PyExc_ValueError, "%zd notes for %zd fresh executions", n, k);
        return NULL;
    }
    k = 0;
    for (Py_ssize_t i = from; i < self->fresh_to && i < self->len; i++) {
        Item *it = &self->q[i];
        if (it->kind == 'E')
            Py_XSETREF(it->note, Py_NewRef(PyList_GET_ITEM(notes, k++)));
    }
    Py_RETURN_NONE;
}

static PyObject *FastPath_take_bind(FastPath *self, PyObject *unused) {
    (void)unused;
    PyObject *b = self->last_bind;
    self->last_bind = NULL;
    return b != NULL ? b : Py_NewRef(Py_None);
}

static PyObject *FastPath_register(FastPath *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "register(name: bytes, entry)");
        return NULL;
    }
    forget_cache(self);
    if (PyDict_SetItem(self->registry, args[0], args[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *FastPath_unregister(FastPath *self, PyObject *name) {
    if (!PyBytes_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "unregister(name: bytes)");
        return NULL;
    }
    forget_cache(self);
    if (PyDict_DelItem(self->registry, name) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError))
            return NULL;
        PyErr_Clear();
    }
    Py_RETURN_NONE;
}

static PyObject *FastPath_clear(FastPath *self, PyObject *unused) {
    (void)unused;
    forget_cache(self);
    PyDict_Clear(self->registry);
    Py_RETURN_NONE;
}

static PyObject *FastPath_get_active(FastPath *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->head < self->len);
}

static int FastPath_init(FastPath *self, PyObject *args, PyObject *kwds) {
    Py_ssize_t limit;
    static char *kwlist[] = {"limit", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n", kwlist, &limit))
        return -1;
    if (limit < 4) {
        PyErr_SetString(PyExc_ValueError, "limit must be at least 4");
        return -1;
    }
    self->limit = limit;
    if (self->registry == NULL && (self->registry = PyDict_New()) == NULL)
        return -1;
    return 0;
}

static int FastPath_traverse(FastPath *self, visitproc visit, void *arg) {
    Py_VISIT(self->registry);
    Py_VISIT(self->cache_entry);
    for (Py_ssize_t i = self->head; i < self->len; i++) {
        Py_VISIT(self->q[i].entry);
        Py_VISIT(self->q[i].params);
        Py_VISIT(self->q[i].note);
    }
    return 0;
}

static int FastPath_clear_refs(FastPath *self) {
    Py_CLEAR(self->registry);
    forget_cache(self);
    Py_CLEAR(self->last_bind);
    queue_clear(self);
    return 0;
}

static void FastPath_dealloc(FastPath *self) {
    PyObject_GC_UnTrack(self);
    FastPath_clear_refs(self);
    PyMem_Free(self->q);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef FastPath_methods[] = {
    {"client", (PyCFunction)FastPath_client, METH_O, "Queue a read of client messages, or -1."},
    {"server", (PyCFunction)FastPath_server, METH_O, "Walk the answers: (end, done, status)."},
    {"take", (PyCFunction)FastPath_take, METH_NOARGS, "Empty the queue, oldest first."},
    {"take_bind", (PyCFunction)FastPath_take_bind, METH_NOARGS, "The last Bind body, once."},
    {"fresh", (PyCFunction)FastPath_fresh, METH_NOARGS, "The Executes the last read queued."},
    {"note", (PyCFunction)FastPath_note, METH_O, "Give each fresh Execute a note, in order."},
    {"register", (PyCFunction)(void (*)(void))FastPath_register, METH_FASTCALL,
     "Let executions of the named statement take this path."},
    {"unregister", (PyCFunction)FastPath_unregister, METH_O, "No more for this statement."},
    {"clear", (PyCFunction)FastPath_clear, METH_NOARGS, "No more for any statement."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef FastPath_getset[] = {
    {"active", (getter)FastPath_get_active, NULL, "The queue is not empty.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pgwarden_proxy.wire._fastpath.FastPath",
    .tp_basicsize = sizeof(FastPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Executions of prepared statements, relayed in C (see _fastpath.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastPath_init,
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_traverse = (traverseproc)FastPath_traverse,
    .tp_clear = (inquiry)FastPath_clear_refs,
    .tp_methods = FastPath_methods,
    .tp_getset = FastPath_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastpath",
    .m_doc = "Executions of prepared statements, relayed in C (see session.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&FastPathType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "FastPath", (PyObject *)&FastPathType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/* A statement event's log line, in C: the same characters as
 *     logs.event_line("pgwarden.events", "statement", event.as_dict())
 * builds with orjson (events.py, pgwarden/logs.py), without the dict and the formatting in
 * Python. With the statement log on, that was the largest Python cost left per statement.
 *
 * statement_line(event, middle, now) -> str | None
 *   event   a StatementEvent
 *   middle  the text between the time and the event: `","level":"info","logger":…,"event":`
 *   now     the line's time (time.time())
 * None when the event holds something this code does not write (an error or approval dict, a
 * value of an unexpected type, a number out of range): the caller then builds the line in
 * Python, the reference (tests/unit/test_events_logs.py compares the two).
 *
 * What orjson does, and so this: strings as UTF-8, escaping only `"`, `\` and characters below
 * U+0020 (\b \t \n \f \r, the others as \u00XX); floats as repr() writes them (the same for
 * every value below 1e16); ints in decimal.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
    char small[1024];
} Buf;

static int grow(Buf *b, Py_ssize_t n) {
    if (b->len + n <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap * 2;
    while (cap < b->len + n)
        cap *= 2;
    char *p;
    if (b->buf == b->small) {
        p = PyMem_Malloc((size_t)cap);
        if (p != NULL)
            memcpy(p, b->buf, (size_t)b->len);
    } else {
        p = PyMem_Realloc(b->buf, (size_t)cap);
    }
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->buf = p;
    b->cap = cap;
    return 0;
}

static int put(Buf *b, const char *s, Py_ssize_t n) {
    if (grow(b, n) < 0)
        return -1;
    memcpy(b->buf + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

#define PUT_LITERAL(b, s) put((b), (s), (Py_ssize_t)(sizeof(s) - 1))

/* A JSON string, as orjson escapes it. -1: error set (e.g. a lone surrogate). */
static int put_string(Buf *b, PyObject *s) {
    Py_ssize_t n;
    const char *p = PyUnicode_AsUTF8AndSize(s, &n);
    if (p == NULL)
        return -1;
    if (grow(b, n * 6 + 2) < 0) /* the worst case: every byte a \u00XX */
        return -1;
    char *o = b->buf + b->len;
    *o++ = '"';
    static const char hex[] = "0123456789abcdef";
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\t': *o++ = 't'; break;
        case '\n': *o++ = 'n'; break;
        case '\f': *o++ = 'f'; break;
        case '\r': *o++ = 'r'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = hex[c >> 4];
            *o++ = hex[c & 15];
        }
    }
    *o++ = '"';
    b->len = o - b->buf;
    return 0;
}

/* 1: written; 0: not a type written here (the caller falls back); -1: error set. */
static int put_str_or_null(Buf *b, PyObject *v) {
    if (v == Py_None)
        return PUT_LITERAL(b, "null") < 0 ? -1 : 1;
    if (!PyUnicode_Check(v)) /* str subclasses too: orjson writes a StrEnum (the statement
                                classes) as its value, which is its text */
        return 0;
    return put_string(b, v) < 0 ? -1 : 1;
}

static int put_strings(Buf *b, PyObject *seq) { /* a list or tuple of str | None */
    if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq))
        return 0;
    if (PUT_LITERAL(b, "[") < 0)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i && PUT_LITERAL(b, ",") < 0)
            return -1;
        int r = put_str_or_null(b, items[i]);
        if (r <= 0)
            return r;
    }
    return PUT_LITERAL(b, "]") < 0 ? -1 : 1;
}

static int put_int(Buf *b, PyObject *v) {
    if (!PyLong_CheckExact(v))
        return 0;
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow)
        return 0;
    if (x == -1 && PyErr_Occurred())
        return -1;
    char s[24], *p = s + sizeof s;
    unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
    do
        *--p = (char)('0' + u % 10);
    while (u /= 10);
    if (x < 0)
        *--p = '-';
    return put(b, p, s + sizeof s - p) < 0 ? -1 : 1;
}

/* `YYYY-MM-DDTHH:MM:SS` of a second, remembered: a line's two times fall in one second or two,
 * and so do the next line's (the Python code caches it the same way). 0: out of range. */
static int second_text(long long sec, char out[19]) {
    static long long cached[2] = {-1, -1};
    static char text[2][19];
    static int next = 0;
    for (int i = 0; i < 2; i++) {
        if (cached[i] == sec) {
            memcpy(out, text[i], 19);
            return 1;
        }
    }
    time_t t = (time_t)sec;
    struct tm tm;
    if (gmtime_r(&t, &tm) == NULL)
        return 0;
    char s[32];
    if (snprintf(s, sizeof s, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec) != 19)
        return 0;
    memcpy(text[next], s, 19);
    cached[next] = sec;
    next ^= 1;
    memcpy(out, s, 19);
    return 1;
}

static void digits(char *end, long long v, int n) { /* v in n digits, zero-padded, backwards */
    for (int i = 0; i < n; i++, v /= 10)
        *--end = (char)('0' + v % 10);
}

/* `iso(ts)` of pgwarden/recording/format.py: "2026-11-27T17:19:18.156326Z", quoted */
static int put_iso(Buf *b, double ts) {
    if (!(ts >= 0 && ts < 253402300800.0)) /* within years 1970..9999 */
        return 0;
    long long sec = (long long)ts;
    long long us = (long long)((ts - (double)sec) * 1000000.0);
    char s[30];
    s[0] = '"';
    if (!second_text(sec, s + 1))
        return 0;
    s[20] = '.';
    digits(s + 27, us, 6);
    s[27] = 'Z';
    s[28] = '"';
    return put(b, s, 29) < 0 ? -1 : 1;
}

/* `_log_time(ts)` of pgwarden/logs.py: milliseconds, after rounding to the microsecond */
static int put_log_time(Buf *b, double ts) {
    if (!(ts >= 0 && ts < 253402300800.0))
        return 0;
    double whole;
    double frac = modf(ts, &whole);
    long long us = (long long)nearbyint(frac * 1e6); /* round(): half to even */
    long long sec = (long long)whole;
    if (us >= 1000000) {
        sec += 1;
        us -= 1000000;
    }
    char s[24];
    if (!second_text(sec, s))
        return 0;
    s[19] = '.';
    digits(s + 23, us / 1000, 3);
    s[23] = 'Z';
    return put(b, s, 24) < 0 ? -1 : 1;
}

/* `round(ms, 3)` as orjson writes it (repr, for the values it can take here) */
static int put_ms(Buf *b, PyObject *v) {
    if (!PyFloat_CheckExact(v))
        return 0;
    double x = PyFloat_AS_DOUBLE(v);
    if (!isfinite(x) || fabs(x) >= 1e15)
        return 0;
    /* round() of a float: correctly rounded through its decimal text, as Python does it */
    char *text = PyOS_double_to_string(x, 'f', 3, 0, NULL);
    if (text == NULL)
        return -1;
    double r = PyOS_string_to_double(text, NULL, NULL);
    PyMem_Free(text);
    if (r == -1.0 && PyErr_Occurred())
        return -1;
    if (r == 0.0)
        r = copysign(0.0, x); /* round(-0.0001, 3) is -0.0 */
    text = PyOS_double_to_string(r, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL)
        return -1;
    int failed = put(b, text, (Py_ssize_t)strlen(text));
    PyMem_Free(text);
    return failed < 0 ? -1 : 1;
}

static PyObject *names[19];
static const char *const name_text[19] = {
    "session_id", "connection", "identity", "statement", "fingerprint", "classes", "command",
    "parameters", "protocol", "decision", "policy", "start", "duration_ms", "rows", "bytes",
    "command_tag", "error", "suspended", "approval",
};
enum {
    F_SESSION, F_CONNECTION, F_IDENTITY, F_STATEMENT, F_FINGERPRINT, F_CLASSES, F_COMMAND,
    F_PARAMETERS, F_PROTOCOL, F_DECISION, F_POLICY, F_START, F_DURATION, F_ROWS, F_BYTES, F_TAG,
    F_ERROR, F_SUSPENDED, F_APPROVAL,
};

static int put_field(Buf *b, int f, PyObject *v) {
    static const char *const keys[19] = {
        "{\"session_id\":", ",\"connection\":", ",\"identity\":", ",\"statement\":",
        ",\"fingerprint\":", ",\"classes\":", ",\"command\":", ",\"parameters\":",
        ",\"protocol\":", ",\"decision\":", ",\"policy\":", ",\"start\":", ",\"duration_ms\":",
        ",\"rows\":", ",\"bytes\":", ",\"command_tag\":", ",\"error\":", ",\"suspended\":",
        ",\"approval\":",
    };
    if (put(b, keys[f], (Py_ssize_t)strlen(keys[f])) < 0)
        return -1;
    switch (f) {
    case F_CLASSES:
        return put_strings(b, v);
    case F_PARAMETERS:
        if (v == Py_None)
            return PUT_LITERAL(b, "null") < 0 ? -1 : 1;
        return PyList_CheckExact(v) ? put_strings(b, v) : 0;
    case F_START:
        if (!PyFloat_CheckExact(v))
            return 0;
        return put_iso(b, PyFloat_AS_DOUBLE(v));
    case F_DURATION:
        return put_ms(b, v);
    case F_ROWS:
    case F_BYTES:
        return put_int(b, v);
    case F_ERROR:
    case F_APPROVAL:
        if (v != Py_None)
            return 0; /* dicts: left to the Python line */
        return PUT_LITERAL(b, "null") < 0 ? -1 : 1;
    case F_SUSPENDED:
        if (v == Py_True)
            return PUT_LITERAL(b, "true") < 0 ? -1 : 1;
        if (v == Py_False)
            return PUT_LITERAL(b, "false") < 0 ? -1 : 1;
        return 0;
    default:
        return put_str_or_null(b, v);
    }
}

static PyObject *statement_line(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3 || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "statement_line(event, middle: str, now: float)");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[2]);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    Py_ssize_t mlen;
    const char *middle = PyUnicode_AsUTF8AndSize(args[1], &mlen);
    if (middle == NULL)
        return NULL;
    Buf b = {.len = 0, .cap = sizeof b.small};
    b.buf = b.small;
    PyObject *result = NULL;
    int r = PUT_LITERAL(&b, "{\"time\":\"") < 0 ? -1 : put_log_time(&b, now);
    if (r > 0)
        r = put(&b, middle, mlen) < 0 ? -1 : 1;
    for (int f = 0; r > 0 && f < 19; f++) {
        PyObject *v = PyObject_GetAttr(args[0], names[f]);
        if (v == NULL) {
            r = -1;
            break;
        }
        r = put_field(&b, f, v);
        Py_DECREF(v);
    }
    if (r > 0 && PUT_LITERAL(&b, "}}\n") < 0)
        r = -1;
    if (r > 0)
        result = PyUnicode_DecodeUTF8(b.buf, b.len, NULL);
    else if (r == 0)
        result = Py_NewRef(Py_None);
    else if (PyErr_ExceptionMatches(PyExc_UnicodeError)) {
        PyErr_Clear(); /* a lone surrogate: the Python line decides what happens */
        result = Py_NewRef(Py_None);
    }
    if (b.buf != b.small)
        PyMem_Free(b.buf);
    return result;
}

static PyMethodDef methods[] = {
    {"statement_line", (PyCFunction)(void (*)(void))statement_line, METH_FASTCALL,
     "A statement event's log line, or None (see _eventline.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_eventline",
    .m_doc = "A statement event's log line in C (see events.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__eventline(void) {
    for (int i = 0; i < 19; i++) {
        if (names[i] == NULL && (names[i] = PyUnicode_InternFromString(name_text[i])) == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}

/* The router's two HTTP/1.1 head parsers in C, and a chunked stream's whole chunks: distserve/router/heads.py is
 * their specification (its Python functions are the fallback where this module is not built, and
 * tests/router/test_heads.py checks that both give the same answer, or raise the same error, for every input).
 * Why C: each PD request parses one client head and two engine heads; here that is one pass over the bytes in
 * place instead of split lists, lower-cased copies and per-line calls: 17 % fewer instructions and 5-11 % less
 * CPU per request for the router (docs/benchmarks.md, "Fourteenth pass"); a streamed answer's pieces are cut out
 * of their chunks here too ("Twenty-first pass").
 *
 * Only ASCII is case-folded (as bytes.lower() does); nothing here keeps state, allocates beyond its result,
 * or reads past the buffer it was given. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* the engine answer's framing states: http1.py's _HEAD, _LENGTH, _CHUNK_SIZE, _UNTIL_CLOSE, _DONE */
enum { ST_HEAD = 0, ST_LENGTH = 1, ST_CHUNK_SIZE = 2, ST_UNTIL_CLOSE = 6, ST_DONE = 7 };

static inline unsigned char lower(unsigned char c) { return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c; }

static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* bytes.strip()'s whitespace (no argument): space, \t, \n, \r, \x0b, \x0c */
static inline int is_ws(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/* the next "\r\n" at or after `from`, or `n` */
static Py_ssize_t line_end(const unsigned char *s, Py_ssize_t from, Py_ssize_t n) {
    while (from + 1 < n) {
        const unsigned char *cr = memchr(s + from, '\r', (size_t)(n - from - 1));
        if (cr == NULL) return n;
        Py_ssize_t at = cr - s;
        if (s[at + 1] == '\n') return at;
        from = at + 1;
    }
    return n;
}

/* whether s[a:b], ASCII case-folded, equals the lower-case `name` */
static int name_is(const unsigned char *s, Py_ssize_t a, Py_ssize_t b, const char *name) {
    size_t len = strlen(name);
    if ((size_t)(b - a) != len) return 0;
    for (size_t i = 0; i < len; i++)
        if (lower(s[a + (Py_ssize_t)i]) != (unsigned char)name[i]) return 0;
    return 1;
}

/* whether s[a:b], ASCII case-folded, contains the lower-case `word` */
static int contains_folded(const unsigned char *s, Py_ssize_t a, Py_ssize_t b, const char *word) {
    Py_ssize_t len = (Py_ssize_t)strlen(word);
    for (Py_ssize_t i = a; i + len <= b; i++) {
        Py_ssize_t j = 0;
        while (j < len && lower(s[i + j]) == (unsigned char)word[j]) j++;
        if (j == len) return 1;
    }
    return 0;
}

/* a run of ASCII digits as a Python int (arbitrary size, as int() gives) */
static PyObject *digits_to_int(const unsigned char *s, Py_ssize_t a, Py_ssize_t b) {
    if (b - a <= 18) {
        long long v = 0;
        for (Py_ssize_t i = a; i < b; i++) v = v * 10 + (s[i] - '0');
        return PyLong_FromLongLong(v);
    }
    PyObject *text = PyUnicode_FromStringAndSize((const char *)s + a, b - a);
    if (text == NULL) return NULL;
    PyObject *v = PyLong_FromUnicodeObject(text, 10);
    Py_DECREF(text);
    return v;
}

static PyObject *value_error_with(const char *what, const char *s, Py_ssize_t n) {
    PyObject *part = PyBytes_FromStringAndSize(s, n);
    if (part != NULL) {
        PyErr_Format(PyExc_ValueError, "%s %R", what, part);
        Py_DECREF(part);
    }
    return NULL;
}

/* a tuple of new references (stolen; NULL if one is NULL): Py_BuildValue parses its format string on every
 * call, ~1,000 instructions, more than the parse it returns (callgrind, tools/bench_hot_path.py) */
static PyObject *tuple_of(Py_ssize_t n, PyObject **items) {
    PyObject *t = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i] == NULL) goto fail;
    t = PyTuple_New(n);
    if (t == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(t, i, items[i]);
    return t;
fail:
    for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(items[i]);
    return NULL;
}

/* answer_head(head: bytes) -> (status, state, remaining, keep_alive); ValueError for a bad head.
 * heads.answer_head_py is the specification. */
static PyObject *answer_head(PyObject *module, PyObject *arg) {
    (void)module;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "answer_head() takes bytes");
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);

    /* "HTTP/1.x NNN" then a space, a CR or the end; like head[9:12].isdigit(), a shorter head may end
     * after one or two digits */
    int ok = n >= 10 && memcmp(s, "HTTP/1.", 7) == 0 && s[8] == ' ';
    Py_ssize_t digits_end = n < 12 ? n : 12;
    for (Py_ssize_t i = 9; ok && i < digits_end; i++) ok = is_digit(s[i]);
    if (ok && n > 12) ok = s[12] == ' ' || s[12] == '\r';
    if (!ok) return value_error_with("bad status line", (const char *)s, n < 80 ? n : 80);
    long status = 0;
    for (Py_ssize_t i = 9; i < digits_end; i++) status = status * 10 + (s[i] - '0');
    if (status >= 100 && status < 200) {
        PyObject *items[4] = {PyLong_FromLong(status), PyLong_FromLong(ST_HEAD), PyLong_FromLong(0), Py_NewRef(Py_False)};
        return tuple_of(4, items);
    }

    /* header lines: each has a colon past its first byte; the three framing fields, first occurrence */
    Py_ssize_t len_a = -1, len_b = -1, te_a = -1, te_b = -1, conn_a = -1, conn_b = -1;
    Py_ssize_t pos = line_end(s, 0, n);
    while (pos < n) {
        Py_ssize_t a = pos + 2;
        Py_ssize_t b = line_end(s, a, n);
        const unsigned char *colon = a < b ? memchr(s + a, ':', (size_t)(b - a)) : NULL;
        if (colon == NULL || colon == s + a)
            return value_error_with("bad header line in", (const char *)s, n < 200 ? n : 200);
        Py_ssize_t c = colon - s;
        if (len_a < 0 && name_is(s, a, c, "content-length")) {
            len_a = c + 1;
            len_b = b;
        } else if (te_a < 0 && name_is(s, a, c, "transfer-encoding")) {
            te_a = c + 1;
            te_b = b;
        } else if (conn_a < 0 && name_is(s, a, c, "connection")) {
            conn_a = c + 1;
            conn_b = b;
        }
        pos = b;
    }
    /* values stripped of whitespace, as _field does */
    Py_ssize_t *ranges[3][2] = {{&len_a, &len_b}, {&te_a, &te_b}, {&conn_a, &conn_b}};
    for (int i = 0; i < 3; i++) {
        Py_ssize_t *a = ranges[i][0], *b = ranges[i][1];
        if (*a < 0) continue;
        while (*a < *b && is_ws(s[*a])) (*a)++;
        while (*b > *a && is_ws(s[*b - 1])) (*b)--;
    }
    int chunked = te_a >= 0 && contains_folded(s, te_a, te_b, "chunked");
    int close = conn_a >= 0 && name_is(s, conn_a, conn_b, "close");
    int keep_alive = s[7] == '1' && !close;
    int state;
    PyObject *remaining = NULL;
    if (chunked) {
        state = ST_CHUNK_SIZE;
    } else if (len_a >= 0) {
        int digits = len_b > len_a;
        for (Py_ssize_t i = len_a; digits && i < len_b; i++) digits = is_digit(s[i]);
        if (!digits) {
            /* the message shows the value lower-cased, as http1.py's Python parser did */
            Py_ssize_t shown = len_b - len_a < 20 ? len_b - len_a : 20;
            char low[20];
            for (Py_ssize_t i = 0; i < shown; i++) low[i] = (char)lower(s[len_a + i]);
            return value_error_with("bad content-length", low, shown);
        }
        remaining = digits_to_int(s, len_a, len_b);
        if (remaining == NULL) return NULL;
        int zero = PyObject_Not(remaining);
        state = zero ? ST_DONE : ST_LENGTH;
    } else if (status == 204 || status == 304) {
        state = ST_DONE;
    } else {
        state = ST_UNTIL_CLOSE;
        keep_alive = 0;
    }
    if (remaining == NULL) remaining = PyLong_FromLong(0);
    if (remaining == NULL) return NULL;
    PyObject *items[4] = {PyLong_FromLong(status), PyLong_FromLong(state), remaining,
                          Py_NewRef(keep_alive ? Py_True : Py_False)};
    return tuple_of(4, items);
}

/* request_head(buf: bytes, end: int, body_limit: int) -> (route, watched, keep_alive, length) or a str:
 * why the request is aiohttp's. heads.request_head_py is the specification. */
static const char *const ROUTES[] = {"/v1/completions", "/v1/chat/completions"};
static const char *const WATCHED[] = {"x-request-id", "authorization", "traceparent", "tracestate"};
static const char *const AIOHTTP_HEADERS[] = {"transfer-encoding", "content-encoding", "expect", "upgrade"};
static PyObject *WATCHED_KEYS[4];   /* the lower-case names as bytes: the watched dict's keys */
static PyObject *WHY_ROUTE, *WHY_FRAMING;

static PyObject *why(PyObject *reason, PyObject *watched) {
    Py_XDECREF(watched);
    return Py_NewRef(reason);
}

static PyObject *request_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "request_head(buf: bytes, end: int, body_limit: int)");
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t end = PyLong_AsSsize_t(args[1]);
    if (end == -1 && PyErr_Occurred()) return NULL;
    long long body_limit = PyLong_AsLongLong(args[2]);
    if (body_limit == -1 && PyErr_Occurred()) return NULL;
    if (end < 0 || end > PyBytes_GET_SIZE(args[0])) {
        PyErr_SetString(PyExc_ValueError, "end outside buf");
        return NULL;
    }
    Py_ssize_t n = end;

    /* the request line: exactly three parts separated by single spaces */
    Py_ssize_t first = line_end(s, 0, n);
    const unsigned char *sp1 = memchr(s, ' ', (size_t)first);
    const unsigned char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(first - (sp1 + 1 - s))) : NULL;
    if (sp2 == NULL || memchr(sp2 + 1, ' ', (size_t)(first - (sp2 + 1 - s))) != NULL) return why(WHY_FRAMING, NULL);
    Py_ssize_t m = sp1 - s, p_a = m + 1, p_b = sp2 - s, v_a = p_b + 1;
    int route = -1;
    for (int i = 0; i < 2; i++)
        if ((size_t)(p_b - p_a) == strlen(ROUTES[i]) && memcmp(s + p_a, ROUTES[i], (size_t)(p_b - p_a)) == 0)
            route = i;
    if (route < 0 || m != 4 || memcmp(s, "POST", 4) != 0) return why(WHY_ROUTE, NULL);
    if (first - v_a != 8 || memcmp(s + v_a, "HTTP/1.1", 8) != 0) return why(WHY_FRAMING, NULL);

    long long length = -1;
    int keep_alive = 1;
    PyObject *watched = PyDict_New();
    if (watched == NULL) return NULL;
    Py_ssize_t pos = first;
    while (pos < n) {
        Py_ssize_t a = pos + 2;
        Py_ssize_t b = line_end(s, a, n);
        pos = b;
        const unsigned char *colon = a < b ? memchr(s + a, ':', (size_t)(b - a)) : NULL;
        /* no colon, an empty name, whitespace before the colon, or a folded line: aiohttp answers it */
        if (colon == NULL || colon == s + a) return why(WHY_FRAMING, watched);
        Py_ssize_t c = colon - s;
        if (s[a] == ' ' || s[a] == '\t' || s[c - 1] == ' ' || s[c - 1] == '\t') return why(WHY_FRAMING, watched);
        /* the value stripped of spaces and tabs only (value.strip(b" \t")) */
        Py_ssize_t va = c + 1, vb = b;
        while (va < vb && (s[va] == ' ' || s[va] == '\t')) va++;
        while (vb > va && (s[vb - 1] == ' ' || s[vb - 1] == '\t')) vb--;
        if (name_is(s, a, c, "content-length")) {
            if (length >= 0 || va == vb) return why(WHY_FRAMING, watched);
            for (Py_ssize_t i = va; i < vb; i++)
                if (!is_digit(s[i])) return why(WHY_FRAMING, watched);
            if (vb - va > 18) return why(WHY_FRAMING, watched); /* past any body limit */
            length = 0;
            for (Py_ssize_t i = va; i < vb; i++) length = length * 10 + (s[i] - '0');
            continue;
        }
        int known = 0;
        for (int i = 0; i < 4 && !known; i++) {
            if (!name_is(s, a, c, WATCHED[i])) continue;
            known = 1;
            if (PyDict_Contains(watched, WATCHED_KEYS[i])) break;
            PyObject *value = PyBytes_FromStringAndSize((const char *)s + va, vb - va);
            if (value == NULL || PyDict_SetItem(watched, WATCHED_KEYS[i], value) < 0) {
                Py_XDECREF(value);
                Py_DECREF(watched);
                return NULL;
            }
            Py_DECREF(value);
        }
        if (known) continue;
        for (int i = 0; i < 4; i++)
            if (name_is(s, a, c, AIOHTTP_HEADERS[i])) return why(WHY_FRAMING, watched);
        if (name_is(s, a, c, "connection")) {
            /* searched in the whole unstripped value, as the Python parser does */
            if (contains_folded(s, c + 1, b, "upgrade")) return why(WHY_FRAMING, watched);
            if (contains_folded(s, c + 1, b, "close")) keep_alive = 0;
        }
    }
    if (length < 0 || length > body_limit) return why(WHY_FRAMING, watched);
    PyObject *items[4] = {PyLong_FromLong(route), watched, Py_NewRef(keep_alive ? Py_True : Py_False),
                          PyLong_FromLongLong(length)};
    return tuple_of(4, items);
}

/* a hex digit's value, or -1 */
static inline int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    c = lower(c);
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* the first "\r\n" lying wholly in s[from:limit], or -1 (bytes.find(b"\r\n", from, limit)) */
static Py_ssize_t crlf_within(const unsigned char *s, Py_ssize_t from, Py_ssize_t limit) {
    while (from + 1 < limit) {
        const unsigned char *cr = memchr(s + from, '\r', (size_t)(limit - from - 1));
        if (cr == NULL) return -1;
        Py_ssize_t at = cr - s;
        if (s[at + 1] == '\n') return at;
        from = at + 1;
    }
    return -1;
}

/* the size on the chunk-size line s[a:b] (its CRLF excluded), or -1 with ValueError set: heads.chunk_size_py */
static long long chunk_size_of(const unsigned char *s, Py_ssize_t a, Py_ssize_t b) {
    Py_ssize_t i = a;
    while (i < b && hex_value(s[i]) >= 0) i++;
    Py_ssize_t j = i;
    while (j < b && (s[j] == ' ' || s[j] == '\t')) j++;
    if (i == a || i - a > 15 || (j < b && s[j] != ';')) {
        value_error_with("bad chunk size", (const char *)s + a, b - a < 40 ? b - a : 40);
        return -1;
    }
    long long v = 0;
    for (Py_ssize_t k = a; k < i; k++) v = v * 16 + hex_value(s[k]);
    return v;
}

/* the next whole chunk at `pos` of s[:n]: its size (> 0) with its data at s[*data:*data + size] and the next
 * chunk at *next; 0 where none is whole there (the last chunk, a cut one, a size line not within 1,024 bytes);
 * -1 with ValueError set for a bad size or a chunk not followed by CRLF */
static long long next_chunk(const unsigned char *s, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t *data, Py_ssize_t *next) {
    Py_ssize_t end = crlf_within(s, pos, pos + 1024 < n ? pos + 1024 : n);
    if (end < 0) return 0;
    long long size = chunk_size_of(s, pos, end);
    if (size <= 0) return size;
    if (size > n) return 0;  /* cannot be whole here (and no overflow below) */
    Py_ssize_t stop = end + 2 + (Py_ssize_t)size;
    if (stop + 2 > n) return 0;
    if (s[stop] != '\r' || s[stop + 1] != '\n') {
        PyErr_SetString(PyExc_ValueError, "missing CRLF after a chunk");
        return -1;
    }
    *data = end + 2;
    *next = stop + 2;
    return size;
}

/* whole_chunks(data: bytes) -> (payload, pos); ValueError as heads.whole_chunks_py, its specification */
static PyObject *whole_chunks(PyObject *module, PyObject *arg) {
    (void)module;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "whole_chunks() takes bytes");
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg), pos = 0, count = 0, total = 0, first = 0, data = 0, next = 0;
    long long size;
    while ((size = next_chunk(s, n, pos, &data, &next)) > 0) {
        if (count++ == 0) first = data;
        total += (Py_ssize_t)size;
        pos = next;
    }
    if (size < 0) return NULL;
    PyObject *payload;
    if (count <= 1) {
        payload = PyBytes_FromStringAndSize((const char *)s + first, total);
    } else {  /* joined: a second walk over what the first found whole */
        payload = PyBytes_FromStringAndSize(NULL, total);
        if (payload != NULL) {
            char *out = PyBytes_AS_STRING(payload);
            Py_ssize_t at = 0;
            for (Py_ssize_t k = 0, p = 0; k < count; k++) {
                size = next_chunk(s, n, p, &data, &next);
                memcpy(out + at, s + data, (size_t)size);
                at += (Py_ssize_t)size;
                p = next;
            }
        }
    }
    PyObject *items[2] = {payload, PyLong_FromSsize_t(pos)};
    return tuple_of(2, items);
}

static PyMethodDef methods[] = {
    {"answer_head", (PyCFunction)answer_head, METH_O,
     "answer_head(head) -> (status, state, remaining, keep_alive): an engine answer's head (no final CRLF CRLF)"},
    {"request_head", (PyCFunction)(void (*)(void))request_head, METH_FASTCALL,
     "request_head(buf, end, body_limit) -> (route, watched, keep_alive, length) or why it is aiohttp's"},
    {"whole_chunks", (PyCFunction)whole_chunks, METH_O,
     "whole_chunks(data) -> (payload, pos): the whole chunks at the start of a chunked body's piece"},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module) {
    for (int i = 0; i < 4; i++) {
        if (WATCHED_KEYS[i] == NULL) {
            WATCHED_KEYS[i] = PyBytes_FromString(WATCHED[i]);
            if (WATCHED_KEYS[i] == NULL) return -1;
        }
    }
    if (WHY_ROUTE == NULL && (WHY_ROUTE = PyUnicode_InternFromString("route")) == NULL) return -1;
    if (WHY_FRAMING == NULL && (WHY_FRAMING = PyUnicode_InternFromString("framing")) == NULL) return -1;
    if (PyModule_AddIntConstant(module, "HEAD", ST_HEAD) < 0) return -1;
    if (PyModule_AddIntConstant(module, "LENGTH", ST_LENGTH) < 0) return -1;
    if (PyModule_AddIntConstant(module, "CHUNK_SIZE", ST_CHUNK_SIZE) < 0) return -1;
    if (PyModule_AddIntConstant(module, "UNTIL_CLOSE", ST_UNTIL_CLOSE) < 0) return -1;
    if (PyModule_AddIntConstant(module, "DONE", ST_DONE) < 0) return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, exec_module}, {0, NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "distserve.router._heads",
    "The router's HTTP/1.1 head parsers in C (distserve/router/heads.py specifies them).", 0, methods, slots,
    NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__heads(void) { return PyModuleDef_Init(&moduledef); }

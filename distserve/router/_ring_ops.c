/* Ring operations: the C versions of distserve/router/ring_ops.py's count_changes_py, splice_py, sample_py and
 * first_clockwise_py
 * (the specifications; read their docstrings first), with the same results. The splice copies the old lists'
 * runs between the edits in one pass (a memcpy for the hashes, a reference per owner), where the Python version
 * slices and appends per edit; it returns None wherever splice_py does. The sample and the first clockwise
 * bisect the hashes' memory (no int made per probe) and walk the owners. Each also returns None for inputs the
 * router never makes (hashes not an array('Q'), owners not a list of str, a hash not an int of 64 bits): the
 * caller then runs the Python version, or for the splice builds the ring from the engines' points, as for
 * splice_py's None. No state between calls. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *array_type; /* array.array */

typedef struct {
    Py_ssize_t at; /* inserted before the old ring's point `at` */
    uint64_t hash;
    PyObject *owner; /* borrowed from join_o */
} Join;

/* The old ring's points [from, from + run) copied to the new lists at `out`: the hashes' memory, a reference per
 * owner. */
static void copy_run(uint64_t *out_h, PyObject *new_o, Py_ssize_t out, const uint64_t *hs, PyObject *owners,
                     Py_ssize_t from, Py_ssize_t run) {
    memcpy(out_h + out, hs + from, run * 8);
    for (Py_ssize_t k = 0; k < run; k++) {
        PyList_SET_ITEM(new_o, out + k, Py_NewRef(PyList_GET_ITEM(owners, from + k)));
    }
}

/* (a, b), taking both references; NULL (both released) where either is NULL or the tuple cannot be made. */
static PyObject *pair(PyObject *a, PyObject *b) {
    PyObject *t = (a == NULL || b == NULL) ? NULL : PyTuple_New(2);
    if (t == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, a);
    PyTuple_SET_ITEM(t, 1, b);
    return t;
}

static Py_ssize_t bisect_left(const uint64_t *hashes, Py_ssize_t n, uint64_t h) {
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (hashes[mid] < h) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

static int compare_positions(const void *a, const void *b) {
    Py_ssize_t x = *(const Py_ssize_t *)a, y = *(const Py_ssize_t *)b;
    return (x > y) - (x < y);
}

/* (at, hash, owner) as Python's tuple order: the owners are exact str, whose comparison cannot fail */
static int compare_joins(const void *a, const void *b) {
    const Join *x = a, *y = b;
    if (x->at != y->at) {
        return x->at < y->at ? -1 : 1;
    }
    if (x->hash != y->hash) {
        return x->hash < y->hash ? -1 : 1;
    }
    return PyUnicode_Compare(x->owner, y->owner);
}

/* A hash as uint64; 0 with *ok = 0 where it is not an int of 64 bits. */
static uint64_t as_hash(PyObject *v, int *ok) {
    if (!PyLong_CheckExact(v)) {
        *ok = 0;
        return 0;
    }
    unsigned long long h = PyLong_AsUnsignedLongLong(v);
    if (h == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        *ok = 0;
        return 0;
    }
    *ok = 1;
    return (uint64_t)h;
}

/* splice(hashes, owners, leave_h, leave_o, join_h, join_o) -> (new_hashes, new_owners) | None */
static PyObject *splice(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "splice() takes 6 arguments");
        return NULL;
    }
    PyObject *hashes = args[0], *owners = args[1], *leave_h = args[2], *leave_o = args[3], *join_h = args[4];
    PyObject *join_o = args[5];
    if (!PyList_CheckExact(owners) || !PyList_CheckExact(leave_h) || !PyList_CheckExact(leave_o) ||
        !PyList_CheckExact(join_h) || !PyList_CheckExact(join_o) ||
        PyList_GET_SIZE(leave_h) != PyList_GET_SIZE(leave_o) || PyList_GET_SIZE(join_h) != PyList_GET_SIZE(join_o)) {
        Py_RETURN_NONE;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(hashes, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *result = NULL;
    Py_ssize_t *drops = NULL;
    Join *joins = NULL;
    Py_ssize_t n = view.len / 8, n_drops = PyList_GET_SIZE(leave_h), n_joins = PyList_GET_SIZE(join_h);
    if (view.itemsize != 8 || view.format == NULL || strcmp(view.format, "Q") != 0 || PyList_GET_SIZE(owners) != n) {
        goto decline;
    }
    const uint64_t *hs = view.buf;
    drops = PyMem_New(Py_ssize_t, n_drops + 1);
    joins = PyMem_New(Join, n_joins + 1);
    if (drops == NULL || joins == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n_drops; k++) { /* each leaving point on the ring, as its owner's */
        int ok;
        uint64_t h = as_hash(PyList_GET_ITEM(leave_h, k), &ok);
        if (!ok) {
            goto decline;
        }
        Py_ssize_t i = bisect_left(hs, n, h);
        if (i >= n || hs[i] != h) {
            goto decline;
        }
        int same = PyObject_RichCompareBool(PyList_GET_ITEM(owners, i), PyList_GET_ITEM(leave_o, k), Py_EQ);
        if (same < 0) {
            goto done;
        }
        if (!same) {
            goto decline;
        }
        drops[k] = i;
    }
    qsort(drops, n_drops, sizeof(Py_ssize_t), compare_positions);
    for (Py_ssize_t k = 1; k < n_drops; k++) {
        if (drops[k] == drops[k - 1]) { /* a hash leaving twice */
            goto decline;
        }
    }
    if (n_drops == 0 && n_joins == 0) {
        result = PyTuple_Pack(2, hashes, owners);
        goto done;
    }
    for (Py_ssize_t k = 0; k < n_joins; k++) {
        int ok;
        uint64_t h = as_hash(PyList_GET_ITEM(join_h, k), &ok);
        PyObject *owner = PyList_GET_ITEM(join_o, k);
        if (!ok || !PyUnicode_CheckExact(owner)) {
            goto decline;
        }
        Py_ssize_t i = bisect_left(hs, n, h);
        if (i < n && hs[i] == h) { /* on the ring already */
            goto decline;
        }
        joins[k].at = i;
        joins[k].hash = h;
        joins[k].owner = owner;
    }
    qsort(joins, n_joins, sizeof(Join), compare_joins);

    Py_ssize_t size = n - n_drops + n_joins;
    PyObject *packed = PyBytes_FromStringAndSize(NULL, size * 8);
    PyObject *new_o = packed == NULL ? NULL : PyList_New(size);
    if (new_o == NULL) {
        Py_XDECREF(packed);
        goto done;
    }
    uint64_t *out_h = (uint64_t *)PyBytes_AS_STRING(packed);
    Py_ssize_t out = 0, prev = 0, d = 0, j = 0;
    while (d < n_drops || j < n_joins) {
        /* the next edit in the old lists' order: an insertion before a drop at the same position */
        int is_join = j < n_joins && (d >= n_drops || joins[j].at <= drops[d]);
        Py_ssize_t at = is_join ? joins[j].at : drops[d];
        copy_run(out_h, new_o, out, hs, owners, prev, at - prev);
        out += at - prev;
        if (is_join) {
            out_h[out] = joins[j].hash;
            Py_INCREF(joins[j].owner);
            PyList_SET_ITEM(new_o, out, joins[j].owner);
            out++;
            prev = at;
            j++;
        } else {
            prev = at + 1;
            d++;
        }
    }
    copy_run(out_h, new_o, out, hs, owners, prev, n - prev);
    PyObject *new_h = PyObject_CallFunction(array_type, "sO", "Q", packed);
    Py_DECREF(packed);
    result = pair(new_h, new_o);
    goto done;

decline:
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(drops);
    PyMem_Free(joins);
    PyBuffer_Release(&view);
    return result;
}

/* The hashes of a ring as uint64 memory (released by the caller); 0 where they are not an array('Q'). */
static int ring_hashes(PyObject *hashes, Py_buffer *view) {
    if (PyObject_GetBuffer(hashes, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (view->itemsize != 8 || view->format == NULL || strcmp(view->format, "Q") != 0) {
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

/* Two owners the same for a set: identity, else equal str (their hashes, cached in each str, compared first). */
static int same_owner(PyObject *a, Py_hash_t ha, PyObject *b, Py_hash_t hb) {
    if (a == b) {
        return 1;
    }
    if (ha != hb) {
        return 0;
    }
    return PyUnicode_Compare(a, b) == 0;
}

/* sample(hashes, owners, start, k) -> (i, the first k distinct owners from position i on, wrapping), i where
 * start falls (bisect_right) */
static PyObject *sample(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "sample() takes 4 arguments");
        return NULL;
    }
    PyObject *owners = args[1];
    int ok;
    uint64_t start = as_hash(args[2], &ok);
    Py_ssize_t k = PyLong_CheckExact(args[3]) ? PyLong_AsSsize_t(args[3]) : -1;
    if (k == -1 && PyErr_Occurred()) {
        PyErr_Clear();
    }
    Py_buffer view;
    if (!ok || k < 0 || k > 64 || !PyList_CheckExact(owners) || !ring_hashes(args[0], &view)) {
        Py_RETURN_NONE;
    }
    PyObject *result = NULL;
    const uint64_t *hs = view.buf;
    Py_ssize_t n = view.len / 8;
    if (PyList_GET_SIZE(owners) != n) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t lo = 0, hi = n; /* bisect_right */
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (start < hs[mid]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    PyObject *picked[64];
    Py_hash_t picked_hash[64];
    Py_ssize_t m = 0;
    for (Py_ssize_t step = 0; step < n && m < k; step++) {
        PyObject *owner = PyList_GET_ITEM(owners, (lo + step) % n);
        if (!PyUnicode_CheckExact(owner)) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        Py_hash_t h = PyObject_Hash(owner);
        if (h == -1) {
            goto done;
        }
        int seen = 0;
        for (Py_ssize_t q = 0; q < m && !seen; q++) {
            seen = same_owner(owner, h, picked[q], picked_hash[q]);
        }
        if (!seen) {
            picked[m] = owner;
            picked_hash[m] = h;
            m++;
        }
    }
    PyObject *list = PyList_New(m);
    if (list == NULL) {
        goto done;
    }
    for (Py_ssize_t q = 0; q < m; q++) {
        PyList_SET_ITEM(list, q, Py_NewRef(picked[q]));
    }
    result = pair(PyLong_FromSsize_t(lo), list);
done:
    PyBuffer_Release(&view);
    return result;
}

/* first_clockwise(owners, i, tied) -> the first owner from position i on (wrapping) that is one of tied, or None */
static PyObject *first_clockwise(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "first_clockwise() takes 3 arguments");
        return NULL;
    }
    PyObject *owners = args[0], *tied = args[2];
    Py_ssize_t i = PyLong_CheckExact(args[1]) ? PyLong_AsSsize_t(args[1]) : -1;
    if (i == -1 && PyErr_Occurred()) {
        PyErr_Clear();
    }
    if (i < 0 || !PyList_CheckExact(owners) || !PyList_CheckExact(tied) || PyList_GET_SIZE(tied) > 64) {
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PyList_GET_SIZE(owners), t = PyList_GET_SIZE(tied);
    if (n == 0) {
        Py_RETURN_NONE;
    }
    Py_hash_t tied_hash[64];
    for (Py_ssize_t q = 0; q < t; q++) {
        PyObject *c = PyList_GET_ITEM(tied, q);
        if (!PyUnicode_CheckExact(c)) {
            Py_RETURN_NONE;
        }
        if ((tied_hash[q] = PyObject_Hash(c)) == -1) {
            return NULL;
        }
    }
    i = i > n ? n : i;
    for (Py_ssize_t step = 0; step < n; step++) {
        PyObject *owner = PyList_GET_ITEM(owners, (i + step) % n);
        if (!PyUnicode_CheckExact(owner)) {
            Py_RETURN_NONE;
        }
        Py_hash_t h = PyObject_Hash(owner);
        if (h == -1) {
            return NULL;
        }
        for (Py_ssize_t q = 0; q < t; q++) {
            if (same_owner(owner, h, PyList_GET_ITEM(tied, q), tied_hash[q])) {
                return Py_NewRef(owner);
            }
        }
    }
    Py_RETURN_NONE;
}

/* Append `engine` to groups[(old, new)], the list made on first use. */
static int group_add(PyObject *groups, PyObject *old, PyObject *new, PyObject *engine) {
    PyObject *key = PyTuple_Pack(2, old, new);
    if (key == NULL) {
        return -1;
    }
    PyObject *group = PyDict_GetItemWithError(groups, key);
    if (group == NULL) {
        if (PyErr_Occurred() || (group = PyList_New(0)) == NULL) {
            Py_DECREF(key);
            return -1;
        }
        int r = PyDict_SetItem(groups, key, group);
        Py_DECREF(group); /* the dict holds it */
        if (r < 0) {
            Py_DECREF(key);
            return -1;
        }
    }
    Py_DECREF(key);
    return PyList_Append(group, engine);
}

/* count_changes(counts, old_counts) -> {(old, new): [engines]}, as count_changes_py; None where either is not a
 * dict */
static PyObject *count_changes(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "count_changes() takes 2 arguments");
        return NULL;
    }
    PyObject *counts = args[0], *old_counts = args[1];
    if (!PyDict_CheckExact(counts) || !PyDict_CheckExact(old_counts)) {
        Py_RETURN_NONE;
    }
    PyObject *zero = PyLong_FromLong(0);
    PyObject *groups = zero == NULL ? NULL : PyDict_New();
    if (groups == NULL) {
        Py_XDECREF(zero);
        return NULL;
    }
    Py_ssize_t pos = 0;
    PyObject *c, *n;
    while (PyDict_Next(counts, &pos, &c, &n)) {
        PyObject *old = PyDict_GetItemWithError(old_counts, c);
        if (old == NULL) {
            if (PyErr_Occurred()) {
                goto failed;
            }
            old = zero;
        }
        int differ = old == n ? 0 : PyObject_RichCompareBool(old, n, Py_NE);
        if (differ < 0 || (differ && group_add(groups, old, n, c) < 0)) {
            goto failed;
        }
    }
    pos = 0;
    PyObject *old;
    while (PyDict_Next(old_counts, &pos, &c, &old)) {
        int kept = PyDict_Contains(counts, c);
        if (kept < 0 || (!kept && group_add(groups, old, zero, c) < 0)) {
            goto failed;
        }
    }
    Py_DECREF(zero);
    return groups;
failed:
    Py_DECREF(zero);
    Py_DECREF(groups);
    return NULL;
}

static PyMethodDef methods[] = {
    {"splice", (PyCFunction)(void (*)(void))splice, METH_FASTCALL,
     "splice(hashes, owners, leave_h, leave_o, join_h, join_o) -> (new_hashes, new_owners), or None: "
     "ring_ops.splice_py's result"},
    {"count_changes", (PyCFunction)(void (*)(void))count_changes, METH_FASTCALL,
     "count_changes(counts, old_counts) -> {(old, new): [engines]}, or None: run ring_ops.count_changes_py"},
    {"sample", (PyCFunction)(void (*)(void))sample, METH_FASTCALL,
     "sample(hashes, owners, start, k) -> (i, the first k distinct owners clockwise), or None: run ring_ops.sample_py"},
    {"first_clockwise", (PyCFunction)(void (*)(void))first_clockwise, METH_FASTCALL,
     "first_clockwise(owners, i, tied) -> the first tied owner from position i on, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ring_ops", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__ring_ops(void) {
    PyObject *array_module = PyImport_ImportModule("array");
    if (array_module == NULL) {
        return NULL;
    }
    array_type = PyObject_GetAttrString(array_module, "array");
    Py_DECREF(array_module);
    if (array_type == NULL) {
        return NULL;
    }
    return PyModule_Create(&module);
}

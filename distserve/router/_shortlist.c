/* kv_aware's shortlist, scored, its tie rule and its blind members: the C versions of
 * distserve/router/shortlist.py's score_py, least_cached_py and blind_members_py (the specifications; read their
 * docstrings first). Same results for every input it accepts; for the rest it returns None and the
 * caller runs score_py: a common level deeper than a distinctive one (score_py's _credit), a level, load, speed
 * or match that is not what the router's own structures hold (dicts of ints, floats), a member without a speed.
 * Nothing passed in is changed: the shortlist is a dict of its own. No state between calls.
 *
 * Floats: every cost is load_weight * load - cache_weight * matched with each operand converted as CPython's
 * float arithmetic converts it (PyLong_AsDouble), in that order; setup.py builds this without contraction
 * (-ffp-contract=off), so no fused multiply-add rounds differently from Python. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

typedef struct {
    double cost;
    PyObject *engine; /* borrowed from the shortlist dict */
    PyObject *load;   /* borrowed (the tracker's int) or owned (a quotient by the speed): see `owned` */
    int owned;
} Near;

/* A Python number as a double the way float arithmetic takes it; -1 on a type this does not handle (the
 * caller falls back), -2 on an error already set. */
static int as_double(PyObject *v, double *out) {
    if (PyLong_CheckExact(v)) {
        double d = PyLong_AsDouble(v);
        if (d == -1.0 && PyErr_Occurred()) {
            return -2;
        }
        *out = d;
        return 0;
    }
    if (PyFloat_CheckExact(v)) {
        *out = PyFloat_AS_DOUBLE(v);
        return 0;
    }
    return -1;
}

/* A match's tokens as a C integer; -1 on a type or size this does not handle. */
static int as_tokens(PyObject *v, long long *out) {
    if (!PyLong_CheckExact(v)) {
        return -1;
    }
    int overflow = 0;
    long long t = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (t == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    *out = t;
    return 0;
}

static void release_near(Near *near, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (near[i].owned) {
            Py_DECREF(near[i].load);
        }
    }
}

#define FALLBACK 1 /* a step's result: hand the input to score_py */
#define FAILED 2   /* an error is set */

/* The shortlist by the cache and the sample (score_py's first two loops) into `matched`. */
static int shortlist(PyObject *levels, PyObject *members, PyObject *sample, Py_ssize_t limit, PyObject *matched,
                     PyObject *zero) {
    Py_ssize_t n_levels = PyList_GET_SIZE(levels);
    Py_ssize_t common_from = n_levels; /* the common levels: levels[common_from:], deepest first */
    for (Py_ssize_t k = n_levels - 1; k >= 0; k--) { /* shallowest first */
        PyObject *holders = PyList_GET_ITEM(levels, k);
        if (!PyDict_CheckExact(holders)) {
            return FALLBACK;
        }
        if (PyDict_GET_SIZE(holders) <= limit) {
            if (PyDict_Update(matched, holders) < 0) {
                return FAILED;
            }
        } else if (PyDict_GET_SIZE(matched) > 0) {
            return FALLBACK; /* a common level deeper than a distinctive one: _credit */
        } else {
            common_from = k;
        }
    }
    if (members != Py_None && PyDict_GET_SIZE(matched) > 0) {
        PyObject *gone = NULL;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(matched, &pos, &key, &value)) {
            int in = PySet_Contains(members, key);
            if (in < 0) {
                Py_XDECREF(gone);
                return FAILED;
            }
            if (!in) {
                if (gone == NULL && (gone = PyList_New(0)) == NULL) {
                    return FAILED;
                }
                if (PyList_Append(gone, key) < 0) {
                    Py_DECREF(gone);
                    return FAILED;
                }
            }
        }
        if (gone != NULL) {
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(gone); i++) {
                if (PyDict_DelItem(matched, PyList_GET_ITEM(gone, i)) < 0) {
                    Py_DECREF(gone);
                    return FAILED;
                }
            }
            Py_DECREF(gone);
        }
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(sample); i++) {
        PyObject *c = PyList_GET_ITEM(sample, i);
        int has = PyDict_Contains(matched, c);
        if (has < 0) {
            return FAILED;
        }
        if (has) {
            continue;
        }
        PyObject *tokens = zero;
        for (Py_ssize_t k = common_from; k < n_levels; k++) {
            PyObject *found = PyDict_GetItemWithError(PyList_GET_ITEM(levels, k), c);
            if (found != NULL) {
                tokens = found;
                break;
            }
            if (PyErr_Occurred()) {
                return FAILED;
            }
        }
        if (PyDict_SetItem(matched, c, tokens) < 0) {
            return FAILED;
        }
    }
    return 0;
}

/* score(levels, members, sample, blind, min_match, current, speed, load_weight, cache_weight, holders_limit) */
static PyObject *score(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "score() takes 10 arguments");
        return NULL;
    }
    PyObject *levels = args[0], *members = args[1], *sample = args[2], *blind = args[3], *current = args[5];
    PyObject *speed = args[6];
    if (!PyList_CheckExact(levels) || !PyList_CheckExact(sample) || !PyDict_CheckExact(current) ||
        (members != Py_None && !PyAnySet_Check(members)) || (blind != Py_None && !PyAnySet_Check(blind)) ||
        (speed != Py_None && !PyDict_CheckExact(speed)) || !PyLong_CheckExact(args[4]) ||
        !PyFloat_CheckExact(args[7]) || !PyFloat_CheckExact(args[8]) || !PyLong_CheckExact(args[9])) {
        Py_RETURN_NONE;
    }
    long long min_match;
    if (as_tokens(args[4], &min_match) < 0) {
        Py_RETURN_NONE;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[9]);
    if (limit == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    double load_weight = PyFloat_AS_DOUBLE(args[7]), cache_weight = PyFloat_AS_DOUBLE(args[8]);

    PyObject *zero = PyLong_FromLong(0);
    PyObject *matched = zero == NULL ? NULL : PyDict_New();
    if (matched == NULL) {
        Py_XDECREF(zero);
        return NULL;
    }
    Near *near = NULL;
    Py_ssize_t n_near = 0;
    PyObject *result = NULL;
    int step = shortlist(levels, members, sample, limit, matched, zero);
    if (step == FAILED) {
        goto done;
    }
    if (step == FALLBACK) {
        goto fallback;
    }
    if (blind != Py_None && PySet_GET_SIZE(blind) > 0) {
        PyObject *gone = PyList_New(0);
        if (gone == NULL) {
            goto done;
        }
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(matched, &pos, &key, &value)) {
            int in = PySet_Contains(blind, key);
            if (in < 0 || (in && PyList_Append(gone, key) < 0)) {
                Py_DECREF(gone);
                goto done;
            }
        }
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(gone); i++) {
            if (PyDict_DelItem(matched, PyList_GET_ITEM(gone, i)) < 0) {
                Py_DECREF(gone);
                goto done;
            }
        }
        Py_DECREF(gone);
        if (PyDict_GET_SIZE(matched) == 0) { /* only blind engines: (matched, 0, inf, []) */
            PyObject *low_obj = PyFloat_FromDouble(INFINITY), *empty = PyList_New(0);
            result = (low_obj == NULL || empty == NULL) ? NULL : PyTuple_New(4);
            if (result == NULL) {
                Py_XDECREF(low_obj);
                Py_XDECREF(empty);
                goto done;
            }
            Py_INCREF(matched);
            PyTuple_SET_ITEM(result, 0, matched);
            PyTuple_SET_ITEM(result, 1, Py_NewRef(zero));
            PyTuple_SET_ITEM(result, 2, low_obj);
            PyTuple_SET_ITEM(result, 3, empty);
            goto done;
        }
    }
    /* min_match, then the best match: each value an int of a sane size, else the fallback */
    long long best = 0;
    int first = 1;
    PyObject *best_obj = NULL;
    {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(matched, &pos, &key, &value)) {
            long long t;
            if (as_tokens(value, &t) < 0) {
                goto fallback;
            }
            if (min_match && t < min_match) {
                if (PyDict_SetItem(matched, key, zero) < 0) { /* the keys stay: safe while iterating */
                    goto done;
                }
                t = 0;
                value = zero;
            }
            if (first || t > best) { /* the first of the largest, as max() */
                best = t;
                best_obj = value;
                first = 0;
            }
        }
    }
    Py_INCREF(best_obj); /* the dict holds it; kept while near's loads are made */
    near = PyMem_New(Near, PyDict_GET_SIZE(matched));
    if (near == NULL) {
        Py_DECREF(best_obj);
        PyErr_NoMemory();
        goto done;
    }
    double low = INFINITY, thr = INFINITY;
    {
        Py_ssize_t pos = 0;
        PyObject *c, *m;
        while (PyDict_Next(matched, &pos, &c, &m)) {
            PyObject *load = PyDict_GetItemWithError(current, c);
            if (load == NULL) {
                if (PyErr_Occurred()) {
                    Py_DECREF(best_obj);
                    goto done;
                }
                load = zero; /* current.get(c, 0) */
            }
            double load_d, m_d, s;
            int r = as_double(load, &load_d);
            if (r == 0) {
                r = as_double(m, &m_d);
            }
            if (r == -2) {
                Py_DECREF(best_obj);
                goto done;
            }
            if (r < 0) {
                Py_DECREF(best_obj);
                goto fallback;
            }
            int owned = 0;
            if (speed != Py_None) {
                PyObject *sp = PyDict_GetItemWithError(speed, c);
                if (sp == NULL) {
                    Py_DECREF(best_obj);
                    if (PyErr_Occurred()) {
                        goto done;
                    }
                    goto fallback; /* score_py raises its KeyError */
                }
                r = as_double(sp, &s);
                if (r == -2) {
                    Py_DECREF(best_obj);
                    goto done;
                }
                if (r < 0 || s == 0.0) {
                    Py_DECREF(best_obj);
                    goto fallback;
                }
                load_d = load_d / s;
                load = PyFloat_FromDouble(load_d);
                if (load == NULL) {
                    Py_DECREF(best_obj);
                    goto done;
                }
                owned = 1;
            }
            double product = load_weight * load_d;
            double credit = cache_weight * m_d;
            double cost = product - credit;
            if (cost <= thr) {
                if (cost < low) {
                    low = cost;
                    thr = cost + 1e-9;
                    Py_ssize_t kept = 0;
                    for (Py_ssize_t i = 0; i < n_near; i++) {
                        if (near[i].cost <= thr) {
                            near[kept++] = near[i];
                        } else if (near[i].owned) {
                            Py_DECREF(near[i].load);
                        }
                    }
                    n_near = kept;
                }
                near[n_near].cost = cost;
                near[n_near].engine = c;
                near[n_near].load = load;
                near[n_near].owned = owned;
                n_near++;
            } else if (owned) {
                Py_DECREF(load);
            }
        }
    }
    PyObject *near_list = PyList_New(n_near);
    if (near_list == NULL) {
        Py_DECREF(best_obj);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_near; i++) {
        PyObject *entry = PyTuple_New(3);
        PyObject *cost = entry == NULL ? NULL : PyFloat_FromDouble(near[i].cost);
        if (cost == NULL) {
            Py_XDECREF(entry);
            Py_DECREF(near_list);
            Py_DECREF(best_obj);
            goto done;
        }
        PyTuple_SET_ITEM(entry, 0, cost);
        Py_INCREF(near[i].engine);
        PyTuple_SET_ITEM(entry, 1, near[i].engine);
        if (!near[i].owned) {
            Py_INCREF(near[i].load);
        }
        PyTuple_SET_ITEM(entry, 2, near[i].load); /* an owned load's reference passes to the tuple */
        near[i].owned = 0;
        PyList_SET_ITEM(near_list, i, entry);
    }
    n_near = 0;
    PyObject *low_obj = PyFloat_FromDouble(low);
    result = low_obj == NULL ? NULL : PyTuple_New(4);
    if (result == NULL) {
        Py_XDECREF(low_obj);
        Py_DECREF(near_list);
        Py_DECREF(best_obj);
        goto done;
    }
    Py_INCREF(matched);
    PyTuple_SET_ITEM(result, 0, matched);
    PyTuple_SET_ITEM(result, 1, best_obj);
    PyTuple_SET_ITEM(result, 2, low_obj);
    PyTuple_SET_ITEM(result, 3, near_list);
    goto done;

fallback:
    result = Py_NewRef(Py_None);
done:
    if (near != NULL) {
        release_near(near, n_near);
        PyMem_Free(near);
    }
    Py_DECREF(matched);
    Py_DECREF(zero);
    return result;
}

/* least_cached(engine_ids, loads, engines) -> the engines of the smallest (families, load, keys), as
 * least_cached_py: the same tuples compared by Python's own rules; None where an argument is not what the router
 * hands (lists, dicts) or a state's sizes are not a pair. */
static PyObject *least_cached(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "least_cached() takes 3 arguments");
        return NULL;
    }
    PyObject *ids = args[0], *loads = args[1], *engines = args[2];
    if (!PyList_CheckExact(ids) || !PyDict_CheckExact(loads) || !PyDict_CheckExact(engines)) {
        Py_RETURN_NONE;
    }
    static PyObject *sizes_name = NULL, *zero_load = NULL, *no_sizes = NULL;
    if (sizes_name == NULL) {
        sizes_name = PyUnicode_InternFromString("sizes");
        zero_load = PyFloat_FromDouble(0.0);
        no_sizes = Py_BuildValue("(ii)", 0, 0);
        if (sizes_name == NULL || zero_load == NULL || no_sizes == NULL) {
            Py_CLEAR(sizes_name);
            return NULL;
        }
    }
    PyObject *best = NULL, *fewest = PyList_New(0);
    if (fewest == NULL) {
        return NULL;
    }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(ids); k++) {
        PyObject *id = PyList_GET_ITEM(ids, k);
        PyObject *state = PyDict_GetItemWithError(engines, id);
        PyObject *sizes;
        if (state == NULL) {
            if (PyErr_Occurred()) {
                goto failed;
            }
            sizes = Py_NewRef(no_sizes);
        } else if ((sizes = PyObject_GetAttr(state, sizes_name)) == NULL) {
            goto failed;
        }
        if (!PyTuple_CheckExact(sizes) || PyTuple_GET_SIZE(sizes) != 2) {
            Py_DECREF(sizes);
            Py_XDECREF(best);
            Py_DECREF(fewest);
            Py_RETURN_NONE;
        }
        PyObject *load = PyDict_GetItemWithError(loads, id);
        if (load == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(sizes);
                goto failed;
            }
            load = zero_load;
        }
        PyObject *size = PyTuple_Pack(3, PyTuple_GET_ITEM(sizes, 0), load, PyTuple_GET_ITEM(sizes, 1));
        Py_DECREF(sizes);
        if (size == NULL) {
            goto failed;
        }
        int lower = best == NULL ? 1 : PyObject_RichCompareBool(size, best, Py_LT);
        int equal = lower ? 0 : PyObject_RichCompareBool(size, best, Py_EQ);
        if (lower < 0 || equal < 0) {
            Py_DECREF(size);
            goto failed;
        }
        if (lower) {
            Py_XSETREF(best, size);
            if (PyList_SetSlice(fewest, 0, PyList_GET_SIZE(fewest), NULL) < 0 || PyList_Append(fewest, id) < 0) {
                goto failed;
            }
        } else {
            Py_DECREF(size);
            if (equal && PyList_Append(fewest, id) < 0) {
                goto failed;
            }
        }
    }
    Py_XDECREF(best);
    return fewest;
failed:
    Py_XDECREF(best);
    Py_DECREF(fewest);
    return NULL;
}

/* blind_members(members, engines, now, timeout) -> (blind, expires), as blind_members_py (the same attribute
 * reads and arithmetic, through Python's own protocols); None where members is not a list or engines not a dict */
static PyObject *blind_members(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "blind_members() takes 4 arguments");
        return NULL;
    }
    PyObject *members = args[0], *engines = args[1], *now = args[2], *timeout = args[3];
    if (!PyList_CheckExact(members) || !PyDict_CheckExact(engines)) {
        Py_RETURN_NONE;
    }
    static PyObject *synced_name = NULL, *followed_name = NULL;
    if (synced_name == NULL) {
        synced_name = PyUnicode_InternFromString("synced");
        followed_name = PyUnicode_InternFromString("followed_at");
        if (synced_name == NULL || followed_name == NULL) {
            Py_CLEAR(synced_name);
            return NULL;
        }
    }
    PyObject *blind = PyList_New(0);
    PyObject *expires = blind == NULL ? NULL : PyFloat_FromDouble(INFINITY);
    if (expires == NULL) {
        Py_XDECREF(blind);
        return NULL;
    }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(members); k++) {
        PyObject *c = PyList_GET_ITEM(members, k);
        PyObject *state = PyDict_GetItemWithError(engines, c);
        if (state == NULL) {
            if (PyErr_Occurred() || PyList_Append(blind, c) < 0) {
                goto failed;
            }
            continue;
        }
        Py_INCREF(state); /* attribute reads may run Python code */
        PyObject *synced = PyObject_GetAttr(state, synced_name);
        int is_synced = synced == NULL ? -1 : PyObject_IsTrue(synced);
        Py_XDECREF(synced);
        if (is_synced < 0) {
            Py_DECREF(state);
            goto failed;
        }
        if (is_synced) {
            Py_DECREF(state);
            continue;
        }
        PyObject *followed = PyObject_GetAttr(state, followed_name);
        Py_DECREF(state);
        PyObject *until = followed == NULL ? NULL : PyNumber_Add(followed, timeout);
        Py_XDECREF(followed);
        if (until == NULL) {
            goto failed;
        }
        int over = PyObject_RichCompareBool(now, until, Py_GE);
        if (over < 0) {
            Py_DECREF(until);
            goto failed;
        }
        if (over) {
            Py_DECREF(until);
            if (PyList_Append(blind, c) < 0) {
                goto failed;
            }
            continue;
        }
        int sooner = PyObject_RichCompareBool(until, expires, Py_LT); /* min(expires, until): expires on a tie */
        if (sooner < 0) {
            Py_DECREF(until);
            goto failed;
        }
        if (sooner) {
            Py_SETREF(expires, until);
        } else {
            Py_DECREF(until);
        }
    }
    PyObject *result = PyTuple_New(2);
    if (result == NULL) {
        goto failed;
    }
    PyTuple_SET_ITEM(result, 0, blind);
    PyTuple_SET_ITEM(result, 1, expires);
    return result;
failed:
    Py_DECREF(blind);
    Py_DECREF(expires);
    return NULL;
}

static PyMethodDef methods[] = {
    {"score", (PyCFunction)(void (*)(void))score, METH_FASTCALL,
     "score(levels, members, sample, blind, min_match, current, speed, load_weight, cache_weight, holders_limit)"
     " -> (matched_of, best_match, low, near), or None: run shortlist.score_py"},
    {"blind_members", (PyCFunction)(void (*)(void))blind_members, METH_FASTCALL,
     "blind_members(members, engines, now, timeout) -> (blind, expires), or None: run shortlist.blind_members_py"},
    {"least_cached", (PyCFunction)(void (*)(void))least_cached, METH_FASTCALL,
     "least_cached(engine_ids, loads, engines) -> the tied engines kept, or None: run shortlist.least_cached_py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_shortlist", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__shortlist(void) { return PyModule_Create(&module); }

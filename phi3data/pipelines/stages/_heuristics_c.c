/* The Gopher filters' hot loops in C: word splitting and the n-gram repetition rules.
 *
 * Both give exactly what the pure-Python code in heuristics.py gives (tests/test_heuristics_c.py checks every
 * shared web page and adversarial Unicode). Character classes are the ones Python's `re` uses for str patterns:
 * \s is Py_UNICODE_ISSPACE, \w is Py_UNICODE_ISALNUM or '_', \d is Py_UNICODE_ISDECIMAL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define KEY_MULT 0x9E3779B97F4A7C15ULL

static inline int is_word(Py_UCS4 c) { return Py_UNICODE_ISALNUM(c) || c == '_'; }
static inline int is_sep(Py_UCS4 c) { return c == '.' || c == ',' || c == ':' || c == '/'; }
static inline int is_apostrophe(Py_UCS4 c) { return c == '\'' || c == 0x2019; }

/* The end of the token that starts at p (p is not whitespace): the first alternative of
 * \d+(?:[.,:/]\d+)+ | \w+(?:['’]\w+)* | \.{2,} | [^\w\s] that matches there, as `re` tries them. */
static Py_ssize_t token_end(int kind, const void *data, Py_ssize_t len, Py_ssize_t p) {
    Py_UCS4 c = PyUnicode_READ(kind, data, p);
    Py_ssize_t q;
    if (Py_UNICODE_ISDECIMAL(c)) {
        q = p + 1;
        while (q < len && Py_UNICODE_ISDECIMAL(PyUnicode_READ(kind, data, q))) q++;
        Py_ssize_t end = -1;
        while (q + 1 < len && is_sep(PyUnicode_READ(kind, data, q))
               && Py_UNICODE_ISDECIMAL(PyUnicode_READ(kind, data, q + 1))) {
            q += 2;
            while (q < len && Py_UNICODE_ISDECIMAL(PyUnicode_READ(kind, data, q))) q++;
            end = q;
        }
        if (end >= 0) return end;
    }
    if (is_word(c)) {
        q = p + 1;
        while (q < len && is_word(PyUnicode_READ(kind, data, q))) q++;
        while (q + 1 < len && is_apostrophe(PyUnicode_READ(kind, data, q))
               && is_word(PyUnicode_READ(kind, data, q + 1))) {
            q += 2;
            while (q < len && is_word(PyUnicode_READ(kind, data, q))) q++;
        }
        return q;
    }
    if (c == '.' && p + 1 < len && PyUnicode_READ(kind, data, p + 1) == '.') {
        q = p + 2;
        while (q < len && PyUnicode_READ(kind, data, q) == '.') q++;
        return q;
    }
    return p + 1; /* [^\w\s]: one character */
}

static PyObject *find_words(PyObject *self, PyObject *text) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "find_words expects a str");
        return NULL;
    }
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t len = PyUnicode_GET_LENGTH(text), p = 0;
    PyObject *words = PyList_New(0);
    if (words == NULL) return NULL;
    while (p < len) {
        if (Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, p))) {
            p++;
            continue;
        }
        Py_ssize_t end = token_end(kind, data, len, p);
        PyObject *word = PyUnicode_Substring(text, p, end);
        if (word == NULL || PyList_Append(words, word) < 0) {
            Py_XDECREF(word);
            Py_DECREF(words);
            return NULL;
        }
        Py_DECREF(word);
        p = end;
    }
    return words;
}

/* An open-addressing table of 64-bit n-gram keys: a count and the first position for each. */
typedef struct {
    uint64_t *keys;
    Py_ssize_t *count, *first;
    unsigned char *used;
    size_t mask;
} KeyTable;

static int table_init(KeyTable *t, Py_ssize_t items) {
    size_t cap = 16;
    while (cap < (size_t)items * 2) cap <<= 1;
    t->mask = cap - 1;
    t->keys = PyMem_Malloc(cap * sizeof(uint64_t));
    t->count = PyMem_Malloc(cap * sizeof(Py_ssize_t));
    t->first = PyMem_Malloc(cap * sizeof(Py_ssize_t));
    t->used = PyMem_Calloc(cap, 1);
    return t->keys && t->count && t->first && t->used;
}

static void table_free(KeyTable *t) {
    PyMem_Free(t->keys);
    PyMem_Free(t->count);
    PyMem_Free(t->first);
    PyMem_Free(t->used);
}

static void table_clear(KeyTable *t) { memset(t->used, 0, t->mask + 1); }

/* The slot of key (inserted with count 0 and first = pos when new). */
static size_t table_slot(KeyTable *t, uint64_t key, Py_ssize_t pos) {
    size_t i = (size_t)((key ^ (key >> 29)) * 0xBF58476D1CE4E5B9ULL >> 17) & t->mask;
    while (t->used[i]) {
        if (t->keys[i] == key) return i;
        i = (i + 1) & t->mask;
    }
    t->used[i] = 1;
    t->keys[i] = key;
    t->count[i] = 0;
    t->first[i] = pos;
    return i;
}

static void gram_keys(const uint64_t *ids, Py_ssize_t m, int n, uint64_t *keys) {
    for (Py_ssize_t i = 0; i < m; i++) {
        uint64_t key = ids[i];
        for (int k = 1; k < n; k++) key = key * KEY_MULT + ids[i + k] + 1;
        keys[i] = key;
    }
}

/* Characters covered by the most frequent n-gram (its length times its count; among equally frequent ones,
 * the one seen first; when all are distinct, the first n-gram). */
static Py_ssize_t top_gram_chars(const uint64_t *ids, const Py_ssize_t *chars, Py_ssize_t len, int n,
                                 uint64_t *keys, KeyTable *t) {
    if (len < n) return 0;
    Py_ssize_t m = len - n + 1, best = 0, start = 0;
    gram_keys(ids, m, n, keys);
    table_clear(t);
    for (Py_ssize_t i = 0; i < m; i++) {
        size_t s = table_slot(t, keys[i], i);
        Py_ssize_t c = ++t->count[s];
        if (c > best || (c == best && t->first[s] < start)) {
            best = c;
            start = t->first[s];
        }
    }
    if (best <= 1) start = 0;
    return (chars[start + n] - chars[start] + n - 1) * best;
}

/* Characters in n-grams that repeat an earlier walked n-gram, the walk jumping n positions past each repeat. */
static Py_ssize_t dup_gram_chars(const uint64_t *ids, const Py_ssize_t *chars, Py_ssize_t len, int n,
                                 uint64_t *keys, KeyTable *t) {
    Py_ssize_t m = len - n + 1, total = 0, i = 0;
    if (m <= 0) return 0;
    gram_keys(ids, m, n, keys);
    table_clear(t);
    while (i < m) {
        size_t s = table_slot(t, keys[i], i);
        if (t->count[s]) {
            total += chars[i + n] - chars[i];
            i += n;
        } else {
            t->count[s] = 1;
            i += 1;
        }
    }
    return total;
}

/* repetition_reason(words, size, top, dup): the first n-gram rule the words break, or None.
 * top and dup are sequences of (n, max_fraction); a rule is broken when its characters / size > max_fraction. */
static PyObject *repetition_reason(PyObject *self, PyObject *args) {
    PyObject *words, *top, *dup;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "O!nOO", &PyList_Type, &words, &size, &top, &dup)) return NULL;
    Py_ssize_t len = PyList_GET_SIZE(words);
    PyObject *result = NULL, *seen = PyDict_New();
    uint64_t *ids = PyMem_Malloc((len + 1) * sizeof(uint64_t));
    uint64_t *keys = PyMem_Malloc((len + 1) * sizeof(uint64_t));
    Py_ssize_t *chars = PyMem_Malloc((len + 1) * sizeof(Py_ssize_t));
    KeyTable table = {0};
    if (seen == NULL || ids == NULL || keys == NULL || chars == NULL || !table_init(&table, len + 1)) {
        PyErr_NoMemory();
        goto done;
    }
    /* ids in order of first appearance; cumulative character counts */
    chars[0] = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        PyObject *word = PyList_GET_ITEM(words, i);
        if (!PyUnicode_Check(word)) {
            PyErr_SetString(PyExc_TypeError, "repetition_reason expects a list of str");
            goto done;
        }
        PyObject *id = PyDict_GetItemWithError(seen, word);
        if (id == NULL) {
            if (PyErr_Occurred()) goto done;
            id = PyLong_FromSsize_t(PyDict_GET_SIZE(seen));
            if (id == NULL || PyDict_SetItem(seen, word, id) < 0) {
                Py_XDECREF(id);
                goto done;
            }
            Py_DECREF(id);
        }
        ids[i] = (uint64_t)PyLong_AsSsize_t(id);
        chars[i + 1] = chars[i] + PyUnicode_GET_LENGTH(word);
    }
    for (int pass = 0; pass < 2; pass++) {
        PyObject *rules = PySequence_Fast(pass == 0 ? top : dup, "rules must be a sequence of (n, fraction)");
        if (rules == NULL) goto done;
        for (Py_ssize_t r = 0; r < PySequence_Fast_GET_SIZE(rules); r++) {
            int n;
            double frac;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(rules, r), "id", &n, &frac) || n < 1) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "n-gram sizes must be >= 1");
                Py_DECREF(rules);
                goto done;
            }
            Py_ssize_t covered = pass == 0 ? top_gram_chars(ids, chars, len, n, keys, &table)
                                           : dup_gram_chars(ids, chars, len, n, keys, &table);
            if ((double)covered / (double)size > frac) {
                result = PyUnicode_FromFormat(pass == 0 ? "top_%d_gram" : "dup_%d_gram", n);
                Py_DECREF(rules);
                goto done;
            }
        }
        Py_DECREF(rules);
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(seen);
    PyMem_Free(ids);
    PyMem_Free(keys);
    PyMem_Free(chars);
    table_free(&table);
    return result;
}

static PyMethodDef methods[] = {
    {"find_words", find_words, METH_O, "The words of a text, as heuristics.WORD_RE.findall(text) finds them."},
    {"repetition_reason", repetition_reason, METH_VARARGS,
     "The first Gopher n-gram rule (top n-grams, then duplicated n-grams) the words break, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_heuristics_c", NULL, -1, methods};

PyMODINIT_FUNC PyInit__heuristics_c(void) { return PyModule_Create(&module); }

/* Top-1 prediction for supervised fastText models with a hierarchical softmax (lid.176), from the flat tables
 * fasttext_lid.py reads out of the model file.
 *
 * It follows fastText's predictLine step by step: whitespace tokens (a "</s>" token ends the line), each word's
 * id if it is in the vocabulary, then its character n-grams of "<word>" hashed with FNV-1a over signed bytes and
 * mapped through the pruning table; the rows averaged; a depth-first walk of the Huffman tree keeping the best
 * leaf. Float operations are fastText's, in its order (built with -ffp-contract=off, so no fused multiply-add),
 * so the probabilities are bit-identical. What is faster: n-gram hashes are extended one character at a time
 * instead of rehashed, the pruned row is one array read instead of two hash-map lookups, and rows come decoded.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_DIM 512

typedef struct {
    const char *blob;          /* the vocabulary's words, back to back */
    const int32_t *starts;     /* word i is blob[starts[i]:starts[i+1]] */
    const int32_t *slots;      /* open addressing: FNV-1a hash -> word id, -1 empty */
    uint32_t slot_mask;
    const int32_t *prune;      /* n-gram bucket -> row after the words, -1 pruned; NULL: the bucket itself */
    const float *rows;         /* input rows, decoded, dim floats each */
    const float *out_rows;     /* output rows (one per inner tree node) and their scale */
    const float *out_scale;
    const int32_t *left, *right;
    int32_t nwords, nlabels, dim, minn, maxn, bucket, eos;
} Model;

static inline uint32_t fnv_byte(uint32_t h, unsigned char b) {
    return (h ^ (uint32_t)(int32_t)(int8_t)b) * 16777619u;
}

static int32_t word_id(const Model *m, const unsigned char *w, Py_ssize_t len) {
    uint32_t h = 2166136261u;
    for (Py_ssize_t i = 0; i < len; i++) h = fnv_byte(h, w[i]);
    for (uint32_t at = h & m->slot_mask;; at = (at + 1) & m->slot_mask) {
        int32_t id = m->slots[at];
        if (id < 0) return -1;
        if (m->starts[id + 1] - m->starts[id] == len && memcmp(m->blob + m->starts[id], w, (size_t)len) == 0)
            return id;
    }
}

static inline void add_row(const Model *m, float *hidden, int64_t row) {
    const float *r = m->rows + row * m->dim;
    for (int32_t j = 0; j < m->dim; j++) hidden[j] += r[j];
}

/* computeSubwords over "<" + word + ">": every n-gram of minn..maxn characters (UTF-8), each added as its row.
 * `buf` holds the bracketed word. Returns how many rows were added. */
static int64_t add_ngrams(const Model *m, float *hidden, const unsigned char *buf, Py_ssize_t len) {
    int64_t added = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        if ((buf[i] & 0xC0) == 0x80) continue;
        uint32_t h = 2166136261u;
        Py_ssize_t j = i;
        for (int32_t n = 1; j < len && n <= m->maxn; n++) {
            h = fnv_byte(h, buf[j++]);
            while (j < len && (buf[j] & 0xC0) == 0x80) h = fnv_byte(h, buf[j++]);
            if (n >= m->minn && !(n == 1 && (i == 0 || j == len))) {
                int32_t id = (int32_t)(h % (uint32_t)m->bucket);
                if (m->prune) {
                    id = m->prune[id];
                    if (id < 0) continue;
                }
                add_row(m, hidden, (int64_t)m->nwords + id);
                added++;
            }
        }
    }
    return added;
}

static inline float std_log(float x) { return (float)log((double)x + 1e-5); }

/* HierarchicalSoftmaxLoss::dfs with k = 1: `best` is the heap of one, ties go to the later leaf as with
 * std::push_heap/pop_heap. */
static void dfs(const Model *m, const float *hidden, int32_t node, float score, float floor_score,
                float *best, int32_t *best_node) {
    if (score < floor_score) return;
    if (*best_node >= 0 && score < *best) return;
    if (m->left[node] == -1 && m->right[node] == -1) {
        if (*best_node < 0 || !(score < *best)) {
            *best = score;
            *best_node = node;
        }
        return;
    }
    const float *r = m->out_rows + (int64_t)(node - m->nlabels) * m->dim;
    float f = 0.0f;
    for (int32_t j = 0; j < m->dim; j++) f += r[j] * hidden[j];
    f = f * m->out_scale[node - m->nlabels];
    f = (float)(1.0 / (double)(1.0f + expf(-f)));
    dfs(m, hidden, m->left[node], score + std_log((float)(1.0 - (double)f)), floor_score, best, best_node);
    dfs(m, hidden, m->right[node], score + std_log(f), floor_score, best, best_node);
}

static inline int is_space(unsigned char c) {
    return c == ' ' || c == '\n' || c == '\r' || c == '\t' || c == '\v' || c == '\f' || c == '\0';
}

/* One text: its top label (-1: no tokens) and probability. `buf`/`cap` is scratch for "<word>". */
static int predict_one(const Model *m, const unsigned char *s, Py_ssize_t len, unsigned char **buf,
                       Py_ssize_t *cap, int32_t *label, float *prob) {
    float hidden[MAX_DIM];
    memset(hidden, 0, sizeof(float) * (size_t)m->dim);
    int64_t count = 0;
    int ended = 0;
    Py_ssize_t p = 0;
    while (p < len && !ended) {
        while (p < len && is_space(s[p])) p++;
        if (p >= len) break;
        Py_ssize_t start = p;
        while (p < len && !is_space(s[p])) p++;
        const unsigned char *w = s + start;
        Py_ssize_t wlen = p - start;
        int32_t wid = word_id(m, w, wlen);
        int is_eos = wlen == 4 && memcmp(w, "</s>", 4) == 0;
        if (wid < 0 && wlen >= 9 && memcmp(w, "__label__", 9) == 0) continue;  /* a label, not a word */
        if (wid >= 0) {
            add_row(m, hidden, wid);
            count++;
        }
        if (!is_eos) {
            if (wlen + 2 > *cap) {
                Py_ssize_t want = (wlen + 2) * 2;
                unsigned char *grown = PyMem_Realloc(*buf, (size_t)want);
                if (!grown) {
                    PyErr_NoMemory();
                    return -1;
                }
                *buf = grown;
                *cap = want;
            }
            (*buf)[0] = '<';
            memcpy(*buf + 1, w, (size_t)wlen);
            (*buf)[wlen + 1] = '>';
            count += add_ngrams(m, hidden, *buf, wlen + 2);
        } else {
            ended = 1;  /* fastText's getLine stops at "</s>" */
        }
    }
    if (!ended && m->eos >= 0) {  /* the newline that ends every line reads as "</s>" */
        add_row(m, hidden, m->eos);
        count++;
    }
    if (count == 0) {
        *label = -1;
        *prob = 0.0f;
        return 0;
    }
    float a = (float)(1.0 / (double)count);
    for (int32_t j = 0; j < m->dim; j++) hidden[j] *= a;
    float best = 0.0f;
    int32_t best_node = -1;
    dfs(m, hidden, 2 * m->nlabels - 2, 0.0f, std_log(0.0f), &best, &best_node);
    *label = best_node;
    *prob = expf(best);
    return 0;
}

static int buffer_of(PyObject *tables, Py_ssize_t i, Py_buffer *view, const void **out) {
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(tables, i), view, PyBUF_SIMPLE) < 0) return -1;
    *out = view->len ? view->buf : NULL;
    return 0;
}

#define N_BUFFERS 9

static PyObject *predict(PyObject *self, PyObject *args) {
    PyObject *texts, *tables;
    Py_ssize_t max_chars;
    if (!PyArg_ParseTuple(args, "OnO!", &texts, &max_chars, &PyTuple_Type, &tables)) return NULL;
    if (PyTuple_GET_SIZE(tables) != N_BUFFERS + 7) {
        PyErr_SetString(PyExc_ValueError, "predict: the model tables are not the ones fasttext_lid.py builds");
        return NULL;
    }
    Model m;
    Py_buffer views[N_BUFFERS];
    const void *ptr[N_BUFFERS];
    int got = 0;
    PyObject *seq = NULL, *ids = NULL, *probs = NULL, *result = NULL;
    unsigned char *buf = NULL;
    Py_ssize_t cap = 0;
    for (; got < N_BUFFERS; got++)
        if (buffer_of(tables, got, &views[got], &ptr[got]) < 0) goto done;
    m.blob = ptr[0];
    m.starts = ptr[1];
    m.slots = ptr[2];
    m.slot_mask = (uint32_t)(views[2].len / 4 - 1);
    m.prune = ptr[3];
    m.rows = ptr[4];
    m.out_rows = ptr[5];
    m.out_scale = ptr[6];
    m.left = ptr[7];
    m.right = ptr[8];
    int32_t *ints[] = {&m.nwords, &m.nlabels, &m.dim, &m.minn, &m.maxn, &m.bucket, &m.eos};
    for (int i = 0; i < 7; i++) {
        long v = PyLong_AsLong(PyTuple_GET_ITEM(tables, N_BUFFERS + i));
        if (v == -1 && PyErr_Occurred()) goto done;
        *ints[i] = (int32_t)v;
    }
    if (m.dim <= 0 || m.dim > MAX_DIM || m.nlabels < 1) {
        PyErr_SetString(PyExc_ValueError, "predict: unsupported model shape");
        goto done;
    }
    seq = PySequence_Fast(texts, "predict expects a list of str");
    if (!seq) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    ids = PyList_New(n);
    probs = PyList_New(n);
    if (!ids || !probs) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *text = PySequence_Fast_GET_ITEM(seq, i), *head = NULL;
        if (!PyUnicode_Check(text)) {
            PyErr_Format(PyExc_TypeError, "predict: text %zd is not a str", i);
            goto done;
        }
        if (max_chars > 0 && PyUnicode_GET_LENGTH(text) > max_chars) {
            head = PyUnicode_Substring(text, 0, max_chars);
            if (!head) goto done;
        }
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(head ? head : text, &len);
        int32_t label;
        float prob;
        int rc = s ? predict_one(&m, (const unsigned char *)s, len, &buf, &cap, &label, &prob) : -1;
        Py_XDECREF(head);
        if (rc < 0) goto done;
        PyList_SET_ITEM(ids, i, PyLong_FromLong(label));
        PyList_SET_ITEM(probs, i, PyFloat_FromDouble((double)prob));
    }
    result = PyTuple_Pack(2, ids, probs);
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(buf);
    Py_XDECREF(seq);
    Py_XDECREF(ids);
    Py_XDECREF(probs);
    return result;
}

static PyMethodDef methods[] = {
    {"predict", predict, METH_VARARGS,
     "predict(texts, max_chars, tables) -> (label ids, probabilities): fastText's top-1 prediction per text."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fasttext_c", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fasttext_c(void) { return PyModule_Create(&module); }

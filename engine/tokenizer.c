/* tokenizer.c: text <-> token ids (see tokenizer.h for the contract).
 *
 * One tokenizer object serves three algorithms, all loaded into the same
 * tables (token texts, decoded pieces, types, a text -> id hash):
 *
 *   - byte-level BPE (GGUF "gpt2", HF ByteLevel): the text is cut into words
 *     by the model's pre-tokenizer patterns (unicode.c's regex engine, with the
 *     patterns of the named pre-tokenizer), each word starts as one symbol per
 *     byte (the GPT-2 byte -> printable character map) and adjacent symbols are
 *     merged by merge rank;
 *   - SentencePiece BPE (GGUF "llama"): spaces become U+2581, a space is
 *     prefixed to each text fragment, symbols start as UTF-8 characters and
 *     the adjacent pair whose concatenation is the highest-scoring token merges
 *     first, as llama.cpp does; characters left without a token fall back to
 *     <0xXX> byte tokens;
 *   - HF BPE over characters (tokenizer.json with byte_fallback, as Llama 2
 *     conversions have): like SentencePiece, but merges by rank.
 *
 * Both merge loops share one engine: a doubly linked list of symbols and a
 * binary heap of candidate pairs ordered by (priority, left position); stale
 * candidates are skipped when popped. Special tokens are cut out of the text
 * first (longest match at the leftmost position); a word cache per call keeps
 * long texts fast. The tokenizer is immutable after load, so any number of
 * threads may tokenize with it at once. */
#define _GNU_SOURCE  /* qsort_r */
#include "engine/tokenizer.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/gguf.h"
#include "engine/util.h"
#include "engine/unicode.h"

/* Token types, as GGUF's tokenizer.ggml.token_type numbers them. */
enum {
    TT_UNDEFINED = 0, TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3,
    TT_USER = 4, TT_UNUSED = 5, TT_BYTE = 6
};

/* Per-token flags. */
enum { TF_EOG = 1, TF_LSTRIP = 2, TF_RSTRIP = 4 };

enum { ALGO_BPE, ALGO_SPM };

#define MAX_STAGES 8

typedef struct {
    uint64_t key;        /* (left id << 32) | right id; UINT64_MAX when empty */
    int32_t rank;
    int32_t id;          /* the merged token */
} merge_ent;

struct eng_tokenizer {
    int algo;                  /* ALGO_BPE: merges by rank; ALGO_SPM: by score */
    bool byte_level;           /* BPE over GPT-2 byte-mapped text */
    bool escape_spaces;        /* ' ' -> U+2581 before the model */
    bool add_space_prefix;     /* prefix each text fragment with a space */
    bool prefix_first_only;    /* ... but only the one at the start of the text */
    bool byte_fallback;        /* characters without a token -> <0xXX> tokens */
    bool ignore_merges;        /* a word that is a token is taken whole */
    bool add_bos;
    int n_vocab;
    char *text;                /* token texts as the vocabulary spells them */
    uint32_t *text_off;        /* (n_vocab + 1) offsets into text */
    char *piece;               /* decoded bytes of each token */
    uint32_t *piece_off;       /* (n_vocab + 1) offsets into piece */
    float *score;              /* (n_vocab) */
    uint8_t *type;             /* (n_vocab) TT_* */
    uint8_t *flags;            /* (n_vocab) TF_* */
    int32_t *vocab_tab;        /* (vocab_mask + 1) open addressing, -1 empty */
    uint32_t vocab_mask;
    merge_ent *merge_tab;      /* (merge_mask + 1) open addressing */
    uint32_t merge_mask;
    int32_t byte_tok[256];     /* token of each byte (byte-level char or <0xXX>), -1 */
    char byte_chars[256][2];   /* UTF-8 of GPT-2's stand-in character of each byte */
    uint8_t byte_char_len[256];
    bool isolated[128];        /* ASCII chars no multi-character token contains: no merge
                                  crosses them, so unsplit text may be cut there */
    eng_uregex *stage[MAX_STAGES];   /* pre-tokenizer split patterns, in order */
    bool stage_drop[MAX_STAGES];     /* drop the matches (Split "Removed") */
    int n_stages;
    int32_t bos, eos, unk, eot, eom, pad;   /* -1 when absent; pad is kept for reference only */
    int32_t *special;          /* ids matched in text, by first byte, longest first */
    uint32_t special_first[257]; /* special[special_first[b] .. special_first[b+1]) start with b */
    char *chat_template;
};

/* ---- small helpers -------------------------------------------------------- */

static uint32_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char) s[i];
        h *= 1099511628211ull;
    }
    return (uint32_t) (h ^ (h >> 29));
}

static uint32_t hash_u64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ull;
    k ^= k >> 33;
    return (uint32_t) k;
}

static uint32_t pow2_at_least(size_t n) {
    uint32_t p = 16;
    while (p < n) p <<= 1;
    return p;
}

static inline const char *tok_text(const eng_tokenizer *t, int32_t id, size_t *len) {
    *len = t->text_off[id + 1] - t->text_off[id];
    return t->text + t->text_off[id];
}

static int32_t vocab_lookup(const eng_tokenizer *t, const char *s, size_t n) {
    uint32_t i = hash_bytes(s, n) & t->vocab_mask;
    for (;;) {
        int32_t id = t->vocab_tab[i];
        if (id < 0) return -1;
        size_t len;
        const char *txt = tok_text(t, id, &len);
        if (len == n && memcmp(txt, s, n) == 0) return id;
        i = (i + 1) & t->vocab_mask;
    }
}

static const merge_ent *merge_lookup(const eng_tokenizer *t, int32_t left, int32_t right) {
    if (!t->merge_tab) return NULL;
    uint64_t key = ((uint64_t) (uint32_t) left << 32) | (uint32_t) right;
    uint32_t i = hash_u64(key) & t->merge_mask;
    for (;;) {
        const merge_ent *e = &t->merge_tab[i];
        if (e->key == UINT64_MAX) return NULL;
        if (e->key == key) return e;
        i = (i + 1) & t->merge_mask;
    }
}

/* GPT-2's byte -> code point map: printable Latin-1 bytes stand for
 * themselves, the others are moved to 256 + n in byte order. */
static void byte_map(uint32_t cp_of_byte[256]) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        cp_of_byte[b] = printable ? (uint32_t) b : (uint32_t) (256 + n++);
    }
}

/* ---- building a tokenizer -------------------------------------------------- */

/* A token text that a loader found (pointing into the file or JSON). */
typedef struct { const char *ptr; size_t len; } srcstr;

static eng_tokenizer *tok_new(void) {
    eng_tokenizer *t = calloc(1, sizeof(*t));
    if (!t) return NULL;
    t->bos = t->eos = t->unk = t->eot = t->eom = t->pad = -1;
    for (int b = 0; b < 256; b++) t->byte_tok[b] = -1;
    return t;
}

void eng_tokenizer_free(eng_tokenizer *t) {
    if (!t) return;
    free(t->text);
    free(t->text_off);
    free(t->piece);
    free(t->piece_off);
    free(t->score);
    free(t->type);
    free(t->flags);
    free(t->vocab_tab);
    free(t->merge_tab);
    for (int i = 0; i < t->n_stages; i++) eng_uregex_free(t->stage[i]);
    free(t->special);
    free(t->chat_template);
    free(t);
}

/* Allocates the per-token arrays for n tokens (types NORMAL, scores 0). */
static int tok_alloc(eng_tokenizer *t, int n, char *err, size_t errlen) {
    t->n_vocab = n;
    t->text_off = calloc((size_t) n + 1, sizeof(uint32_t));
    t->piece_off = calloc((size_t) n + 1, sizeof(uint32_t));
    t->score = calloc((size_t) n, sizeof(float));
    t->type = malloc((size_t) n);
    t->flags = calloc((size_t) n, 1);
    if (!t->text_off || !t->piece_off || !t->score || !t->type || !t->flags) {
        eng_seterr(err, errlen, "tokenizer: out of memory for %d tokens", n);
        return -1;
    }
    memset(t->type, TT_NORMAL, (size_t) n);
    return 0;
}

/* Packs the token texts and builds the text -> id hash. Duplicate texts are an
 * error, as in llama.cpp (a second id could never be produced). Empty texts
 * (holes) are kept out of the hash. */
static int tok_set_texts(eng_tokenizer *t, const srcstr *src, const char *what,
                         char *err, size_t errlen) {
    size_t total = 0;
    for (int i = 0; i < t->n_vocab; i++) {
        total += src[i].len;
        if (total > UINT32_MAX / 2) {
            eng_seterr(err, errlen, "%s: token texts too large", what);
            return -1;
        }
    }
    t->text = malloc(total ? total : 1);
    uint32_t size = pow2_at_least((size_t) t->n_vocab * 2);
    t->vocab_tab = malloc((size_t) size * sizeof(int32_t));
    if (!t->text || !t->vocab_tab) {
        eng_seterr(err, errlen, "%s: out of memory", what);
        return -1;
    }
    t->vocab_mask = size - 1;
    memset(t->vocab_tab, 0xff, (size_t) size * sizeof(int32_t));
    uint32_t off = 0;
    for (int i = 0; i < t->n_vocab; i++) {
        t->text_off[i] = off;
        if (src[i].len) memcpy(t->text + off, src[i].ptr, src[i].len);
        off += (uint32_t) src[i].len;
    }
    t->text_off[t->n_vocab] = off;
    for (int i = 0; i < t->n_vocab; i++) {
        size_t len;
        const char *s = tok_text(t, i, &len);
        if (len == 0) continue;
        uint32_t h = hash_bytes(s, len) & t->vocab_mask;
        for (;;) {
            int32_t id = t->vocab_tab[h];
            if (id < 0) {
                t->vocab_tab[h] = i;
                break;
            }
            size_t l2;
            const char *s2 = tok_text(t, id, &l2);
            if (l2 == len && memcmp(s, s2, len) == 0) {
                eng_seterr(err, errlen, "%s: duplicate token text '%.*s' at ids %d and %d", what,
                       (int) (len > 40 ? 40 : len), s, id, i);
                return -1;
            }
            h = (h + 1) & t->vocab_mask;
        }
    }
    return 0;
}

/* Adds merge (left text, right text) with the given rank. Merges whose parts
 * or result are not tokens can never apply and are skipped; returns 1 then. */
static int tok_add_merge(eng_tokenizer *t, const char *a, size_t na, const char *b, size_t nb,
                         int32_t rank, char *buf) {
    int32_t ia = vocab_lookup(t, a, na), ib = vocab_lookup(t, b, nb);
    if (ia < 0 || ib < 0) return 1;
    memcpy(buf, a, na);
    memcpy(buf + na, b, nb);
    int32_t im = vocab_lookup(t, buf, na + nb);
    if (im < 0) return 1;
    uint64_t key = ((uint64_t) (uint32_t) ia << 32) | (uint32_t) ib;
    uint32_t i = hash_u64(key) & t->merge_mask;
    while (t->merge_tab[i].key != UINT64_MAX) {
        if (t->merge_tab[i].key == key) return 1;   /* first (best) rank wins */
        i = (i + 1) & t->merge_mask;
    }
    t->merge_tab[i].key = key;
    t->merge_tab[i].rank = rank;
    t->merge_tab[i].id = im;
    return 0;
}

static int tok_alloc_merges(eng_tokenizer *t, size_t n, char *err, size_t errlen) {
    uint32_t size = pow2_at_least(n * 2 + 1);
    t->merge_tab = malloc((size_t) size * sizeof(merge_ent));
    if (!t->merge_tab) {
        eng_seterr(err, errlen, "tokenizer: out of memory for %zu merges", n);
        return -1;
    }
    for (uint32_t i = 0; i < size; i++) t->merge_tab[i].key = UINT64_MAX;
    t->merge_mask = size - 1;
    return 0;
}

/* Parses "<0xHH>"; returns the byte or -1. */
static int parse_byte_token(const char *s, size_t len) {
    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10
              : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static bool is_special_type(int type) {
    return type == TT_CONTROL || type == TT_USER || type == TT_UNKNOWN;
}

static int cmp_special(const void *a, const void *b, void *ctx);

/* Everything derived from texts and types: decoded pieces, byte tokens, the
 * special-token index and the end-of-generation set. */
static int tok_finish(eng_tokenizer *t, char *err, size_t errlen) {
    const int n = t->n_vocab;
    uint32_t cp_of_byte[256];
    int16_t byte_of_cp[324];
    byte_map(cp_of_byte);
    memset(byte_of_cp, 0xff, sizeof(byte_of_cp));
    for (int b = 0; b < 256; b++) byte_of_cp[cp_of_byte[b]] = (int16_t) b;

    /* byte tokens */
    for (int b = 0; b < 256; b++) {
        char buf[8];
        int32_t id = -1;
        int len = eng_utf8_encode(cp_of_byte[b], buf);
        memcpy(t->byte_chars[b], buf, 2);
        t->byte_char_len[b] = (uint8_t) len;
        if (t->byte_level) id = vocab_lookup(t, buf, (size_t) len);
        if (id < 0) {
            snprintf(buf, sizeof(buf), "<0x%02X>", b);
            id = vocab_lookup(t, buf, 6);
        }
        t->byte_tok[b] = id;
    }

    /* decoded pieces: at most as long as the text (byte-level and U+2581
     * decoding only shrink it) */
    t->piece = malloc(t->text_off[n] ? t->text_off[n] : 1);
    if (!t->piece) {
        eng_seterr(err, errlen, "tokenizer: out of memory");
        return -1;
    }
    uint32_t off = 0;
    for (int i = 0; i < n; i++) {
        size_t len;
        const char *s = tok_text(t, i, &len);
        char *dst = t->piece + off;
        size_t m = 0;
        int type = t->type[i];
        int byte = type == TT_BYTE ? parse_byte_token(s, len) : -1;
        if (byte >= 0) {
            dst[m++] = (char) byte;
        } else if (type == TT_NORMAL && t->byte_level) {
            for (size_t k = 0; k < len;) {
                size_t cl;
                uint32_t cp = eng_utf8_decode(s + k, len - k, &cl);
                if (cp < 324 && byte_of_cp[cp] >= 0) {
                    dst[m++] = (char) byte_of_cp[cp];
                } else {
                    memcpy(dst + m, s + k, cl);
                    m += cl;
                }
                k += cl;
            }
        } else if (type == TT_NORMAL && t->escape_spaces) {
            for (size_t k = 0; k < len;) {
                if (k + 3 <= len && memcmp(s + k, "\xE2\x96\x81", 3) == 0) {
                    dst[m++] = ' ';
                    k += 3;
                } else {
                    dst[m++] = s[k++];
                }
            }
        } else if (type == TT_NORMAL || is_special_type(type) || type == TT_BYTE) {
            memcpy(dst, s, len);
            m = len;
        }
        /* TT_UNUSED and TT_UNDEFINED decode to nothing, as in llama.cpp */
        t->piece_off[i] = off;
        off += (uint32_t) m;
    }
    t->piece_off[n] = off;

    /* ASCII characters that no mergeable token of several symbols contains
     * (symbols are bytes of the decoded piece for byte-level BPE, characters
     * of the text otherwise) */
    memset(t->isolated, 1, sizeof(t->isolated));
    for (int i = 0; i < n; i++) {
        bool mergeable = t->algo == ALGO_SPM ? t->type[i] == TT_NORMAL || t->type[i] == TT_USER
                                             : t->type[i] != TT_UNUSED && t->type[i] != TT_BYTE;
        if (!mergeable) continue;
        size_t len, cl = 0;
        const char *s;
        if (t->byte_level) {
            s = t->piece + t->piece_off[i];
            len = t->piece_off[i + 1] - t->piece_off[i];
            if (len <= 1) continue;
        } else {
            s = tok_text(t, i, &len);
            if (len == 0 || (eng_utf8_decode(s, len, &cl), cl == len)) continue;
        }
        for (size_t k = 0; k < len; k++) {
            if ((unsigned char) s[k] < 128) t->isolated[(unsigned char) s[k]] = false;
        }
    }

    /* special tokens that may be cut out of text, grouped by first byte and
     * longest first within a group */
    int n_special = 0;
    for (int i = 0; i < n; i++) {
        if (is_special_type(t->type[i]) && t->text_off[i + 1] > t->text_off[i]) n_special++;
    }
    t->special = malloc((size_t) (n_special ? n_special : 1) * sizeof(int32_t));
    if (!t->special) {
        eng_seterr(err, errlen, "tokenizer: out of memory");
        return -1;
    }
    n_special = 0;
    for (int i = 0; i < n; i++) {
        if (is_special_type(t->type[i]) && t->text_off[i + 1] > t->text_off[i]) {
            t->special[n_special++] = i;
        }
    }
    qsort_r(t->special, (size_t) n_special, sizeof(int32_t), cmp_special, t);
    memset(t->special_first, 0, sizeof(t->special_first));
    for (int k = 0; k < n_special; k++) {
        unsigned char b = (unsigned char) t->text[t->text_off[t->special[k]]];
        t->special_first[b + 1]++;
    }
    for (int b = 0; b < 256; b++) t->special_first[b + 1] += t->special_first[b];

    /* end of generation: the named ids plus the usual end-of-turn texts */
    static const char *const eog_texts[] = {
        "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "</s>", "<end_of_turn>",
        "<|eom_id|>", "<|end_of_text|>", "<EOT>", "<end_of_utterance>",
        "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>",
    };
    for (size_t k = 0; k < sizeof(eog_texts) / sizeof(eog_texts[0]); k++) {
        int32_t id = vocab_lookup(t, eog_texts[k], strlen(eog_texts[k]));
        if (id >= 0) t->flags[id] |= TF_EOG;
    }
    const int32_t named[] = {t->eos, t->eot, t->eom};
    for (size_t k = 0; k < 3; k++) {
        if (named[k] >= 0) t->flags[named[k]] |= TF_EOG;
    }
    if (t->add_bos && t->bos < 0) t->add_bos = false;
    return 0;
}

static int cmp_special(const void *a, const void *b, void *ctx) {
    const eng_tokenizer *t = ctx;
    int32_t ia = *(const int32_t *) a, ib = *(const int32_t *) b;
    unsigned char fa = (unsigned char) t->text[t->text_off[ia]];
    unsigned char fb = (unsigned char) t->text[t->text_off[ib]];
    if (fa != fb) return fa < fb ? -1 : 1;
    uint32_t la = t->text_off[ia + 1] - t->text_off[ia];
    uint32_t lb = t->text_off[ib + 1] - t->text_off[ib];
    if (la != lb) return la > lb ? -1 : 1;
    return ia < ib ? -1 : ia > ib;
}

/* ---- pre-tokenizers --------------------------------------------------------- */

#define RX_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
#define RX_CONTRACTIONS_I "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
#define RX_LLAMA3 RX_CONTRACTIONS_I "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}" \
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RX_QWEN2 RX_CONTRACTIONS_I "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}" \
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RX_UPPER "[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]"
#define RX_LOWER "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]"
#define RX_CJK "[\xE4\xB8\x80-\xE9\xBE\xA5\xE0\xA0\x80-\xE4\xB8\x80\xEA\xB0\x80-\xED\x9F\xBF]+"
#define RX_PORO " ?[^(\\s|.,!?\xE2\x80\xA6\xE3\x80\x82\xEF\xBC\x8C\xE3\x80\x81\xE0\xA5\xA4\xDB\x94\xD8\x8C)]+"

/* Split patterns of each pre-tokenizer llama.cpp names (tokenizer.ggml.pre),
 * taken from the models' tokenizer.json files. Applied in order: each splits
 * the pieces the previous one produced. */
static const char *const PRE_DEFAULT[] = {
    "[\\p{P}\\$\\+<=>\\^~\\|]+", RX_GPT2, "\\p{N}+", "[0-9][0-9][0-9]", NULL};
static const char *const PRE_GPT2[] = {RX_GPT2, NULL};
static const char *const PRE_STARCODER[] = {"\\p{N}", RX_GPT2, NULL};
static const char *const PRE_FALCON[] = {
    "[\\p{P}\\$\\+<=>\\^~\\|`]+", RX_GPT2, "[0-9][0-9][0-9]", NULL};
static const char *const PRE_LLAMA3[] = {RX_LLAMA3, NULL};
static const char *const PRE_QWEN2[] = {RX_QWEN2, NULL};
static const char *const PRE_QWEN35[] = {
    RX_CONTRACTIONS_I "|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", NULL};
static const char *const PRE_DEEPSEEK_CODER[] = {
    "[\\r\\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", RX_CJK, "\\p{N}", NULL};
static const char *const PRE_DEEPSEEK_LLM[] = {
    "[\\r\\n]",
    "\\s?[A-Za-z\xC2\xB5\xC3\x80-\xC3\x96\xC3\x98-\xC3\xB6\xC3\xB8-\xC6\xBA\xC6\xBC-\xC6\xBF"
    "\xC7\x84-\xCA\x93\xCA\x95-\xCA\xAF\xCD\xB0-\xCD\xB3\xCD\xB6\xCD\xB7\xCD\xBB-\xCD\xBD"
    "\xCD\xBF\xCE\x86\xCE\x88-\xCE\x8A\xCE\x8C\xCE\x8E-\xCE\xA1\xCE\xA3-\xCF\xB5\xCF\xB7-\xD2\x81"
    "\xD2\x8A-\xD4\xAF\xD4\xB1-\xD5\x96\xE1\x82\xA0-\xE1\x83\x85\xE1\x8E\xA0-\xE1\x8F\xB5"
    "\xE1\x8F\xB8-\xE1\x8F\xBD\xE1\xB2\x90-\xE1\xB2\xBA\xE1\xB2\xBD-\xE1\xB2\xBF"
    "\xE1\xB4\x80-\xE1\xB4\xAB\xE1\xB5\xAB-\xE1\xB5\xB7\xE1\xB5\xB9-\xE1\xB6\x9A"
    "\xE1\xB8\x80-\xE1\xBC\x95\xE1\xBC\x98-\xE1\xBC\x9D\xE1\xBC\xA0-\xE1\xBD\x85"
    "\xE1\xBD\x88-\xE1\xBD\x8D\xE1\xBD\x90-\xE1\xBD\x97\xE1\xBD\x99\xE1\xBD\x9B\xE1\xBD\x9D"
    "\xE1\xBD\x9F-\xE1\xBD\xBD\xE1\xBE\x80-\xE1\xBE\xB4\xE1\xBE\xB6-\xE1\xBE\xBC\xE1\xBE\xBE"
    "\xE1\xBF\x82-\xE1\xBF\x84\xE1\xBF\x86-\xE1\xBF\x8C\xE1\xBF\x90-\xE1\xBF\x93"
    "\xE1\xBF\x96-\xE1\xBF\x9B\xE1\xBF\xA0-\xE1\xBF\xAC\xE1\xBF\xB2-\xE1\xBF\xB4"
    "\xE1\xBF\xB6-\xE1\xBF\xBC\xE2\x84\x82\xE2\x84\x87\xE2\x84\x8A-\xE2\x84\x93\xE2\x84\x95"
    "\xE2\x84\x99-\xE2\x84\x9D\xE2\x84\xA4\xE2\x84\xA6\xE2\x84\xA8\xE2\x84\xAA-\xE2\x84\xAD"
    "\xE2\x84\xAF-\xE2\x84\xB4\xE2\x84\xB9\xE2\x84\xBC-\xE2\x84\xBF\xE2\x85\x85-\xE2\x85\x89"
    "\xE2\x85\x8E\xE2\x86\x83\xE2\x86\x84\xE2\xB0\x80-\xE2\xB1\xBB\xE2\xB1\xBE-\xE2\xB3\xA4"
    "\xE2\xB3\xAB-\xE2\xB3\xAE\xE2\xB3\xB2\xE2\xB3\xB3\xEA\x99\x80-\xEA\x99\xAD"
    "\xEA\x9A\x80-\xEA\x9A\x9B\xEA\x9C\xA2-\xEA\x9D\xAF\xEA\x9D\xB1-\xEA\x9E\x87"
    "\xEA\x9E\x8B-\xEA\x9E\x8E\xEA\xAD\xB0-\xEA\xAE\xBF\xEF\xAC\x80-\xEF\xAC\x86"
    "\xEF\xAC\x93-\xEF\xAC\x97\xEF\xBC\xA1-\xEF\xBC\xBA\xEF\xBD\x81-\xEF\xBD\x9A"
    "\xF0\x90\x90\x80-\xF0\x90\x91\x8F\xF0\x90\x92\xB0-\xF0\x90\x93\x93"
    "\xF0\x90\x93\x98-\xF0\x90\x93\xBB\xF0\x90\xB2\x80-\xF0\x90\xB2\xB2"
    "\xF0\x90\xB3\x80-\xF0\x90\xB3\xB2\xF0\x91\xA2\xA0-\xF0\x91\xA3\x9F"
    "\xF0\x9E\xA4\x80-\xF0\x9E\xA5\x83]+",
    "\\s?[!-/:-~\xEF\xBC\x81-\xEF\xBC\x8F\xEF\xBC\x9A-\xEF\xBD\x9E\xE2\x80\x98-\xE2\x80\x9F"
    "\xE3\x80\x80-\xE3\x80\x82]+",
    "\\s+$", RX_CJK, "\\p{N}+", NULL};
static const char *const PRE_DEEPSEEK3[] = {
    "\\p{N}{1,3}",
    "[\xE4\xB8\x80-\xE9\xBE\xA5\xE3\x81\x80-\xE3\x82\x9F\xE3\x82\xA0-\xE3\x83\xBF]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", NULL};
static const char *const PRE_GPT4O[] = {
    "[^\\r\\n\\p{L}\\p{N}]?" RX_UPPER "*" RX_LOWER "+" RX_CONTRACTIONS_I "?"
    "|[^\\r\\n\\p{L}\\p{N}]?" RX_UPPER "+" RX_LOWER "*" RX_CONTRACTIONS_I "?"
    "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", NULL};
static const char *const PRE_TEKKEN[] = {
    "[^\\r\\n\\p{L}\\p{N}]?" RX_UPPER "*" RX_LOWER "+"
    "|[^\\r\\n\\p{L}\\p{N}]?" RX_UPPER "+" RX_LOWER "*"
    "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", NULL};
static const char *const PRE_PORO[] = {RX_PORO, NULL};
static const char *const PRE_VIKING[] = {RX_PORO, "\\p{N}", NULL};
static const char *const PRE_SEED_CODER[] = {
    RX_CONTRACTIONS_I "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", NULL};
static const char *const PRE_BAILING[] = {
    "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+", NULL};
static const char *const PRE_EXAONE_MOE[] = {
    RX_CONTRACTIONS_I "|[^\\r\\n\\p{L}\\p{N}]?(?:\\p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+", NULL};
static const char *const PRE_MINICPM5[] = {
    "\\p{N}{1,3}",
    RX_CONTRACTIONS_I "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", NULL};
static const char *const PRE_UFAKZEKA[] = {
    "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    NULL};
static const char *const PRE_LAGUNA[] = {"[^\\n]+|[\\n]+", RX_QWEN2, NULL};

typedef struct {
    const char *names;              /* space-separated tokenizer.ggml.pre values */
    const char *const *patterns;
    bool ignore_merges;
    bool add_bos;                   /* default when add_bos_token is absent */
} pre_entry;

static const pre_entry PRE_TABLE[] = {
    {"default", PRE_DEFAULT, false, false},
    {"llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
     PRE_LLAMA3, true, true},
    {"dbrx smaug-bpe chatglm-bpe glm4", PRE_LLAMA3, false, false},
    {"deepseek-llm", PRE_DEEPSEEK_LLM, false, false},
    {"deepseek-coder", PRE_DEEPSEEK_CODER, false, false},
    {"deepseek-v3 hunyuan-dense joyai-llm hy_v4", PRE_DEEPSEEK3, false, false},
    {"falcon", PRE_FALCON, false, false},
    {"gpt2 gpt-2 mpt phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum "
     "modern-bert olmo jais trillion granite-docling exaone4 jina-v1-en jina-v2-code roberta-bpe",
     PRE_GPT2, false, false},
    {"starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
     PRE_STARCODER, false, false},
    {"qwen2 deepseek-r1-qwen kormo f2llmv2 stablelm2 hunyuan megrez solar-open grok-2",
     PRE_QWEN2, false, false},
    {"qwen35", PRE_QWEN35, false, false},
    {"poro-chat bloom gpt3-finnish", PRE_PORO, false, false},
    {"viking", PRE_VIKING, false, false},
    {"tekken", PRE_TEKKEN, true, true},
    {"gpt-4o llama4 kanana2 talkie minimax-m2", PRE_GPT4O, false, false},
    {"seed-coder", PRE_SEED_CODER, false, false},
    {"bailingmoe bailingmoe2 llada-moe", PRE_BAILING, false, false},
    {"exaone-moe", PRE_EXAONE_MOE, false, false},
    {"minicpm5", PRE_MINICPM5, true, false},
    {"ufakzeka", PRE_UFAKZEKA, false, false},
    {"laguna", PRE_LAGUNA, false, false},
};

static bool name_in_list(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ' ');
        size_t len = e ? (size_t) (e - p) : strlen(p);
        if (len == n && memcmp(p, name, n) == 0) return true;
        if (!e) break;
        p = e + 1;
    }
    return false;
}

static const pre_entry *pre_find(const char *name) {
    for (size_t i = 0; i < sizeof(PRE_TABLE) / sizeof(PRE_TABLE[0]); i++) {
        if (name_in_list(PRE_TABLE[i].names, name)) return &PRE_TABLE[i];
    }
    return NULL;
}

static int tok_add_stage(eng_tokenizer *t, const char *pattern, bool drop, const char *what,
                         char *err, size_t errlen) {
    if (t->n_stages == MAX_STAGES) {
        eng_seterr(err, errlen, "%s: more than %d pre-tokenizer splits", what, MAX_STAGES);
        return -1;
    }
    char msg[256];
    eng_uregex *re = eng_uregex_compile(pattern, msg, sizeof(msg));
    if (!re) {
        eng_seterr(err, errlen, "%s: pre-tokenizer %s", what, msg);
        return -1;
    }
    t->stage[t->n_stages] = re;
    t->stage_drop[t->n_stages] = drop;
    t->n_stages++;
    return 0;
}

/* ---- encoding ------------------------------------------------------------------ */

typedef struct {
    int32_t prev, next;     /* neighbours in the word, -1 at the ends */
    uint32_t start, len;    /* bytes of the word; len 0 once merged away */
    int32_t id;             /* token of these bytes, -1 if none */
} sym;

typedef struct {
    double prio;            /* lower merges first: rank, or -score */
    int32_t left, right;    /* symbol indices */
    uint32_t len;           /* left.len + right.len when the pair was seen */
    int32_t id;             /* the merged token */
} cand;

typedef struct {
    uint32_t key_off, key_len;   /* word bytes in cache_keys */
    uint32_t ids_off, n_ids;     /* ids in cache_ids */
} cache_ent;

#define CACHE_MAX_WORD 64
#define CACHE_MAX_ENTRIES (1u << 20)

/* Scratch memory of one eng_tokenize call. */
typedef struct {
    sym *syms;
    size_t cap_syms;
    cand *heap;
    size_t n_heap, cap_heap;
    int32_t *ids;            /* ids of the current word */
    size_t n_ids, cap_ids;
    uint32_t *cps;           /* code points of the current fragment */
    uint32_t *cp_off;        /* (n_cps + 1) byte offsets of each code point */
    size_t cap_cps, cap_off;
    eng_spans spans[2];
    char *buf;               /* escaped fragment text */
    size_t cap_buf;
    cache_ent *cache;        /* (cache_mask + 1) open addressing, n_ids == UINT32_MAX empty */
    uint32_t cache_mask, n_cache;
    char *cache_keys;
    size_t n_keys, cap_keys;
    int32_t *cache_ids;
    size_t n_cids, cap_cids;
    bool oom;
} work;

typedef struct {
    int32_t *out;
    size_t cap;
    size_t n;               /* ids produced, even past cap */
} outbuf;

static inline void out_push(outbuf *o, int32_t id) {
    if (o->n < o->cap) o->out[o->n] = id;
    o->n++;
}

/* Grows *p (elements of size sz) to hold at least n; sets w->oom on failure. */
static bool grow(work *w, void **p, size_t *cap, size_t n, size_t sz) {
    if (n <= *cap) return true;
    size_t c = *cap ? *cap : 64;
    while (c < n) c *= 2;
    void *q = realloc(*p, c * sz);
    if (!q) {
        w->oom = true;
        return false;
    }
    *p = q;
    *cap = c;
    return true;
}

static void work_free(work *w) {
    free(w->syms);
    free(w->heap);
    free(w->ids);
    free(w->cps);
    free(w->cp_off);
    free(w->spans[0].v);
    free(w->spans[1].v);
    free(w->buf);
    free(w->cache);
    free(w->cache_keys);
    free(w->cache_ids);
}

static inline bool cand_before(const cand *a, const cand *b) {
    return a->prio < b->prio || (a->prio == b->prio && a->left < b->left);
}

static void heap_push(work *w, cand c) {
    if (!grow(w, (void **) &w->heap, &w->cap_heap, w->n_heap + 1, sizeof(cand))) return;
    size_t i = w->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!cand_before(&c, &w->heap[parent])) break;
        w->heap[i] = w->heap[parent];
        i = parent;
    }
    w->heap[i] = c;
}

static cand heap_pop(work *w) {
    cand top = w->heap[0];
    cand last = w->heap[--w->n_heap];
    size_t i = 0, n = w->n_heap;
    for (;;) {
        size_t l = 2 * i + 1, best = i;
        const cand *bc = &last;
        if (l < n && cand_before(&w->heap[l], bc)) {
            best = l;
            bc = &w->heap[l];
        }
        if (l + 1 < n && cand_before(&w->heap[l + 1], bc)) best = l + 1;
        if (best == i) break;
        w->heap[i] = w->heap[best];
        i = best;
    }
    if (n > 0) w->heap[i] = last;
    return top;
}

/* Queues the pair (l, r) if it can merge. */
static void try_pair(const eng_tokenizer *t, work *w, const char *s, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const sym *L = &w->syms[l], *R = &w->syms[r];
    cand c = {.left = l, .right = r, .len = L->len + R->len};
    if (t->algo == ALGO_BPE) {
        if (L->id < 0 || R->id < 0) return;
        const merge_ent *e = merge_lookup(t, L->id, R->id);
        if (!e) return;
        c.prio = e->rank;
        c.id = e->id;
    } else {
        /* SentencePiece builds only normal (and user) pieces by merging */
        c.id = vocab_lookup(t, s + L->start, c.len);
        if (c.id < 0 || (t->type[c.id] != TT_NORMAL && t->type[c.id] != TT_USER)) return;
        c.prio = -(double) t->score[c.id];
    }
    heap_push(w, c);
}

static void ids_push(work *w, int32_t id) {
    if (grow(w, (void **) &w->ids, &w->cap_ids, w->n_ids + 1, sizeof(int32_t))) {
        w->ids[w->n_ids++] = id;
    }
}

/* Tokenizes one word s[0, n) into w->ids by merging symbols. */
static void merge_word(const eng_tokenizer *t, work *w, const char *s, size_t n) {
    w->n_ids = 0;
    if (t->ignore_merges) {
        int32_t id;
        if (t->byte_level) {
            if (!grow(w, (void **) &w->buf, &w->cap_buf, 2 * n, 1)) return;
            size_t m = 0;
            for (size_t i = 0; i < n; i++) {
                unsigned char b = (unsigned char) s[i];
                memcpy(w->buf + m, t->byte_chars[b], t->byte_char_len[b]);
                m += t->byte_char_len[b];
            }
            id = vocab_lookup(t, w->buf, m);
        } else {
            id = vocab_lookup(t, s, n);
        }
        if (id >= 0) {
            ids_push(w, id);
            return;
        }
    }
    if (!grow(w, (void **) &w->syms, &w->cap_syms, n, sizeof(sym))) return;
    int32_t n_syms = 0;
    for (size_t i = 0; i < n;) {
        sym *S = &w->syms[n_syms];
        size_t cl = 1;
        if (t->byte_level) {
            S->id = t->byte_tok[(unsigned char) s[i]];
        } else {
            eng_utf8_decode(s + i, n - i, &cl);
            S->id = vocab_lookup(t, s + i, cl);
        }
        S->start = (uint32_t) i;
        S->len = (uint32_t) cl;
        S->prev = n_syms - 1;
        S->next = i + cl < n ? n_syms + 1 : -1;
        n_syms++;
        i += cl;
    }
    if (n_syms == 0) return;
    w->n_heap = 0;
    for (int32_t i = 1; i < n_syms; i++) try_pair(t, w, s, i - 1, i);
    while (w->n_heap > 0 && !w->oom) {
        cand c = heap_pop(w);
        sym *L = &w->syms[c.left], *R = &w->syms[c.right];
        if (L->len == 0 || R->len == 0 || L->next != c.right || L->len + R->len != c.len) {
            continue;   /* stale: one side changed since the pair was queued */
        }
        L->len += R->len;
        L->id = c.id;
        R->len = 0;
        L->next = R->next;
        if (R->next >= 0) w->syms[R->next].prev = c.left;
        try_pair(t, w, s, L->prev, c.left);
        try_pair(t, w, s, c.left, L->next);
    }
    for (int32_t i = 0; i >= 0; i = w->syms[i].next) {
        const sym *S = &w->syms[i];
        if (S->id >= 0) {
            ids_push(w, S->id);
        } else if (t->byte_level) {
            /* a byte the vocabulary lacks: dropped, as llama.cpp does */
        } else if (t->byte_fallback) {
            for (uint32_t k = 0; k < S->len; k++) {
                int32_t b = t->byte_tok[(unsigned char) s[S->start + k]];
                if (b < 0) b = t->unk;
                if (b >= 0) ids_push(w, b);
            }
        } else if (t->unk >= 0) {
            ids_push(w, t->unk);
        }
    }
}

/* merge_word through the per-call cache of word -> ids. */
static void encode_word(const eng_tokenizer *t, work *w, const char *s, size_t n, outbuf *o) {
    bool use_cache = w->cache && n <= CACHE_MAX_WORD;
    uint32_t slot = 0;
    if (use_cache) {
        slot = hash_bytes(s, n) & w->cache_mask;
        for (;;) {
            const cache_ent *e = &w->cache[slot];
            if (e->n_ids == UINT32_MAX) break;
            if (e->key_len == n && memcmp(w->cache_keys + e->key_off, s, n) == 0) {
                for (uint32_t k = 0; k < e->n_ids; k++) out_push(o, w->cache_ids[e->ids_off + k]);
                return;
            }
            slot = (slot + 1) & w->cache_mask;
        }
    }
    merge_word(t, w, s, n);
    for (size_t k = 0; k < w->n_ids; k++) out_push(o, w->ids[k]);
    if (use_cache && w->n_cache < CACHE_MAX_ENTRIES / 2 &&
        grow(w, (void **) &w->cache_keys, &w->cap_keys, w->n_keys + n, 1) &&
        grow(w, (void **) &w->cache_ids, &w->cap_cids, w->n_cids + w->n_ids, sizeof(int32_t))) {
        cache_ent *e = &w->cache[slot];
        e->key_off = (uint32_t) w->n_keys;
        e->key_len = (uint32_t) n;
        e->ids_off = (uint32_t) w->n_cids;
        e->n_ids = (uint32_t) w->n_ids;
        memcpy(w->cache_keys + w->n_keys, s, n);
        w->n_keys += n;
        memcpy(w->cache_ids + w->n_cids, w->ids, w->n_ids * sizeof(int32_t));
        w->n_cids += w->n_ids;
        w->n_cache++;
    }
}

/* Tokenizes plain text that is ready for the model (spaces escaped). */
static void encode_text(const eng_tokenizer *t, work *w, const char *s, size_t n, outbuf *o) {
    if (t->algo == ALGO_SPM || t->n_stages == 0) {
        /* one long word: cut it at characters no merge can cross, which
         * gives the same pieces with much smaller merge heaps */
        size_t seg = 0;
        for (size_t i = 0; i < n; i++) {
            unsigned char b = (unsigned char) s[i];
            if (b < 128 && t->isolated[b]) {
                if (i > seg) encode_word(t, w, s + seg, i - seg, o);
                encode_word(t, w, s + i, 1, o);
                seg = i + 1;
            }
        }
        if (n > seg) encode_word(t, w, s + seg, n - seg, o);
        return;
    }
    /* code points, then the pre-tokenizer splits */
    if (!grow(w, (void **) &w->cps, &w->cap_cps, n + 1, sizeof(uint32_t)) ||
        !grow(w, (void **) &w->cp_off, &w->cap_off, n + 1, sizeof(uint32_t))) {
        return;
    }
    size_t n_cps = 0;
    for (size_t i = 0; i < n;) {
        size_t cl;
        w->cps[n_cps] = eng_utf8_decode(s + i, n - i, &cl);
        w->cp_off[n_cps++] = (uint32_t) i;
        i += cl;
    }
    w->cp_off[n_cps] = (uint32_t) n;
    eng_spans *cur = &w->spans[0], *next = &w->spans[1];
    cur->n = 0;
    if (eng_spans_push(cur, 0, (uint32_t) n_cps) < 0) {
        w->oom = true;
        return;
    }
    for (int k = 0; k < t->n_stages; k++) {
        next->n = 0;
        if (eng_uregex_split(t->stage[k], w->cps, cur, next, t->stage_drop[k]) < 0) {
            w->oom = true;
            return;
        }
        eng_spans *tmp = cur;
        cur = next;
        next = tmp;
    }
    for (size_t k = 0; k < cur->n && !w->oom; k++) {
        uint32_t a = w->cp_off[cur->v[k].start], b = w->cp_off[cur->v[k].end];
        encode_word(t, w, s + a, b - a, o);
    }
}

/* Tokenizes a fragment of plain text (no special tokens in it). */
static void encode_fragment(const eng_tokenizer *t, work *w, const char *s, size_t n,
                            bool prefix_space, outbuf *o) {
    /* byte-level prefixes a space only where there is none (HF ByteLevel
     * add_prefix_space); SentencePiece always does (llama.cpp) */
    if (prefix_space && t->byte_level && n > 0 && s[0] == ' ') prefix_space = false;
    if (!t->escape_spaces && !prefix_space) {
        encode_text(t, w, s, n, o);
        return;
    }
    char *b = malloc(3 * n + 3);
    if (!b) {
        w->oom = true;
        return;
    }
    size_t m = 0;
    if (prefix_space) {
        if (t->escape_spaces) {
            memcpy(b, "\xE2\x96\x81", 3);
            m = 3;
        } else {
            b[m++] = ' ';
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (s[i] == ' ' && t->escape_spaces) {
            memcpy(b + m, "\xE2\x96\x81", 3);
            m += 3;
        } else {
            b[m++] = s[i];
        }
    }
    encode_text(t, w, b, m, o);
    free(b);
}

/* The longest special token at s[0, n), or -1. Without parse_special only
 * user-defined tokens count (they are always cut out, as Hugging Face does
 * with non-special added tokens). */
static int32_t match_special(const eng_tokenizer *t, const char *s, size_t n, bool parse_special) {
    unsigned char b = (unsigned char) s[0];
    for (uint32_t k = t->special_first[b]; k < t->special_first[b + 1]; k++) {
        int32_t id = t->special[k];
        if (!parse_special && t->type[id] != TT_USER) continue;
        size_t len;
        const char *txt = tok_text(t, id, &len);
        if (len <= n && memcmp(txt, s, len) == 0) return id;
    }
    return -1;
}

/* Does the fragment starting at byte `start` get a space prefix? Fragments
 * start the text or follow a special token; SentencePiece (llama.cpp)
 * prefixes each, Metaspace's prepend_scheme "first" only the first. */
static bool want_prefix(const eng_tokenizer *t, size_t start) {
    return t->add_space_prefix && (!t->prefix_first_only || start == 0);
}

int eng_tokenize(const eng_tokenizer *t, const char *text, size_t len, bool add_bos,
                 bool parse_special, int32_t *out, int cap, char *err, size_t errlen) {
    if (!t || (!text && len > 0) || cap < 0 || (!out && cap > 0)) {
        eng_seterr(err, errlen, "eng_tokenize: invalid arguments");
        return -1;
    }
    if (len > (size_t) INT32_MAX / 4) {
        eng_seterr(err, errlen, "eng_tokenize: text of %zu bytes is too long (max %d)", len,
               INT32_MAX / 4);
        return -1;
    }
    outbuf o = {.out = out, .cap = (size_t) cap};
    work w = {0};
    if (len > 1024) {
        uint32_t size = pow2_at_least(len / 4 < CACHE_MAX_ENTRIES ? len / 4 : CACHE_MAX_ENTRIES);
        w.cache = malloc((size_t) size * sizeof(cache_ent));
        if (w.cache) {
            w.cache_mask = size - 1;
            for (uint32_t i = 0; i < size; i++) w.cache[i].n_ids = UINT32_MAX;
        }
    }
    if (add_bos && t->bos >= 0) out_push(&o, t->bos);
    size_t seg = 0, pos = 0;
    while (pos < len && !w.oom) {
        int32_t id = t->special_first[256] ? match_special(t, text + pos, len - pos, parse_special) : -1;
        if (id < 0) {
            pos++;
            continue;
        }
        size_t seg_end = pos;
        if (t->flags[id] & TF_LSTRIP) {
            while (seg_end > seg && isspace((unsigned char) text[seg_end - 1])) seg_end--;
        }
        if (seg_end > seg) {
            encode_fragment(t, &w, text + seg, seg_end - seg, want_prefix(t, seg), &o);
        }
        out_push(&o, id);
        pos += t->text_off[id + 1] - t->text_off[id];
        if (t->flags[id] & TF_RSTRIP) {
            while (pos < len && isspace((unsigned char) text[pos])) pos++;
        }
        seg = pos;
    }
    if (seg < len && !w.oom) {
        encode_fragment(t, &w, text + seg, len - seg, want_prefix(t, seg), &o);
    }
    bool oom = w.oom;
    work_free(&w);
    if (oom) {
        eng_seterr(err, errlen, "eng_tokenize: out of memory");
        return -1;
    }
    if (o.n > INT_MAX) {
        eng_seterr(err, errlen, "eng_tokenize: more than %d tokens", INT_MAX);
        return -1;
    }
    return (int) o.n;
}

/* ---- decoding and accessors ---------------------------------------------------- */

int eng_tokenizer_n_vocab(const eng_tokenizer *t) { return t->n_vocab; }
int32_t eng_tokenizer_bos(const eng_tokenizer *t) { return t->bos; }
int32_t eng_tokenizer_eos(const eng_tokenizer *t) { return t->eos; }
bool eng_tokenizer_add_bos(const eng_tokenizer *t) { return t->add_bos; }
const char *eng_tokenizer_chat_template(const eng_tokenizer *t) { return t->chat_template; }

bool eng_tokenizer_is_eog(const eng_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_vocab && (t->flags[id] & TF_EOG);
}

int32_t eng_tokenizer_find(const eng_tokenizer *t, const char *text) {
    size_t n = strlen(text);
    return n ? vocab_lookup(t, text, n) : -1;
}

/* The bytes a token decodes to (empty for control tokens unless special). */
static const char *token_piece(const eng_tokenizer *t, int32_t id, bool special, size_t *len) {
    *len = 0;
    if (id < 0 || id >= t->n_vocab) return "";
    if (!special && (t->type[id] == TT_CONTROL || t->type[id] == TT_UNKNOWN)) return "";
    *len = t->piece_off[id + 1] - t->piece_off[id];
    return t->piece + t->piece_off[id];
}

int eng_token_to_bytes(const eng_tokenizer *t, int32_t id, bool special, char *buf, int cap) {
    size_t len;
    const char *p = token_piece(t, id, special, &len);
    if (len > (size_t) (cap < 0 ? 0 : cap)) return (int) len;
    if (len) memcpy(buf, p, len);
    return (int) len;
}

void eng_detok_init(eng_detok *d) {
    memset(d, 0, sizeof(*d));
    d->first = true;
}

typedef struct {
    char *out;
    int cap, n;
    bool full;               /* a character did not fit: drop the rest */
} dwriter;

static void dw_put(dwriter *w, const char *s, int len) {
    if (w->full || w->n + len > w->cap) {
        w->full = true;
        return;
    }
    memcpy(w->out + w->n, s, (size_t) len);
    w->n += len;
}

#define REPLACEMENT_CHAR "\xEF\xBF\xBD"

/* Feeds one byte into the UTF-8 assembler. An ill-formed sequence becomes one
 * U+FFFD per maximal subpart (as Python's errors="replace" does). */
static void detok_byte(eng_detok *d, dwriter *w, unsigned char b) {
    for (;;) {
        if (d->n_pending == 0) {
            int need = eng_utf8_lead_len(b);
            if (need == 1) {
                dw_put(w, (const char *) &b, 1);
            } else if (need == 0) {
                dw_put(w, REPLACEMENT_CHAR, 3);
            } else {
                d->pending[0] = (char) b;
                d->n_pending = 1;
            }
            return;
        }
        unsigned char b0 = (unsigned char) d->pending[0];
        unsigned char lo = 0x80, hi = 0xBF;
        if (d->n_pending == 1) {
            if (b0 == 0xE0) lo = 0xA0;
            else if (b0 == 0xED) hi = 0x9F;
            else if (b0 == 0xF0) lo = 0x90;
            else if (b0 == 0xF4) hi = 0x8F;
        }
        if (b >= lo && b <= hi) {
            d->pending[d->n_pending++] = (char) b;
            if (d->n_pending == eng_utf8_lead_len(b0)) {
                dw_put(w, d->pending, d->n_pending);
                d->n_pending = 0;
            }
            return;
        }
        dw_put(w, REPLACEMENT_CHAR, 3);
        d->n_pending = 0;   /* and b starts afresh */
    }
}

int eng_detok_push(eng_detok *d, const eng_tokenizer *t, int32_t id, char *out, int cap) {
    size_t len;
    const char *p = token_piece(t, id, false, &len);
    if (len > 0 && d->first) {
        /* SentencePiece prefixed a space when encoding: take it back once */
        if (t->escape_spaces && t->add_space_prefix && p[0] == ' ') {
            p++;
            len--;
        }
        d->first = false;
    }
    dwriter w = {.out = out, .cap = cap < 0 ? 0 : cap};
    for (size_t i = 0; i < len; i++) detok_byte(d, &w, (unsigned char) p[i]);
    return w.n;
}

int eng_detok_flush(eng_detok *d, char *out, int cap) {
    dwriter w = {.out = out, .cap = cap < 0 ? 0 : cap};
    if (d->n_pending > 0) dw_put(&w, REPLACEMENT_CHAR, 3);
    d->n_pending = 0;
    return w.n;
}

/* ---- loading from GGUF ------------------------------------------------------- */

/* Reads a GGUF string array by walking its length prefixes (O(n)). */
static void gguf_strings(const eng_gguf_kv *kv, srcstr *dst, uint64_t n) {
    const char *p = kv->arr_data;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t len;
        memcpy(&len, p, sizeof(len));
        dst[i].ptr = p + sizeof(len);
        dst[i].len = (size_t) len;
        p += sizeof(len) + len;
    }
}

/* The array under key with string elements, or NULL (message set) when it is
 * missing or of another type. */
static const eng_gguf_kv *gguf_array(const eng_gguf *g, const char *key, bool want_strings,
                                     bool required, int *failed, char *err, size_t errlen) {
    const eng_gguf_kv *kv = eng_gguf_find(g, key);
    if (!kv) {
        if (required) {
            eng_seterr(err, errlen, "%s: missing key %s", eng_gguf_path(g), key);
            *failed = 1;
        }
        return NULL;
    }
    bool numeric = kv->type == ENG_GGUF_ARRAY && kv->arr_type != ENG_GGUF_STRING &&
                   kv->arr_type != ENG_GGUF_ARRAY && kv->arr_type != ENG_GGUF_BOOL;
    bool ok = want_strings ? (kv->type == ENG_GGUF_ARRAY && kv->arr_type == ENG_GGUF_STRING)
                           : numeric;
    if (!ok) {
        eng_seterr(err, errlen, "%s: key %s: expected an array of %s, found %s of %s", eng_gguf_path(g),
               key, want_strings ? "string" : "numbers", eng_gguf_vtype_name(kv->type),
               kv->type == ENG_GGUF_ARRAY ? eng_gguf_vtype_name(kv->arr_type) : "-");
        *failed = 1;
        return NULL;
    }
    return kv;
}

/* Reads an optional token id. Like llama.cpp, a bad one (negative, of a
 * non-integer type, or outside the vocabulary) is reported and ignored: the
 * model is still usable without it. */
static void gguf_special_id(const eng_gguf *g, const char *key, int n_vocab, int32_t *id) {
    uint32_t v;
    char msg[256] = "";
    int rc = eng_gguf_get_u32(g, key, &v, msg, sizeof(msg));
    if (rc < 0) {
        fprintf(stderr, "kvserve: %s: %s is unusable (%s), ignored\n", eng_gguf_path(g), key, msg);
    } else if (rc == 0) {
        if (v < (uint32_t) n_vocab) {
            *id = (int32_t) v;
        } else {
            fprintf(stderr, "kvserve: %s: %s = %u is outside the vocabulary (%d tokens), ignored\n",
                    eng_gguf_path(g), key, v, n_vocab);
        }
    }
}

static int gguf_bool(const eng_gguf *g, const char *key, bool *out, char *err, size_t errlen) {
    int v;
    int rc = eng_gguf_get_bool(g, key, &v, err, errlen);
    if (rc == 0) *out = v != 0;
    return rc < 0 ? -1 : 0;
}

eng_tokenizer *eng_tokenizer_from_gguf(const struct eng_gguf *g, char *err, size_t errlen) {
    const char *path = eng_gguf_path(g);
    char *model = NULL, *pre = NULL, *name = NULL;
    srcstr *src = NULL;
    char *mbuf = NULL;
    eng_tokenizer *t = tok_new();
    int failed = 0;
    if (!t) {
        eng_seterr(err, errlen, "%s: out of memory", path);
        return NULL;
    }
    int rc = eng_gguf_get_str(g, "tokenizer.ggml.model", &model, err, errlen);
    if (rc != 0) {
        if (rc > 0) eng_seterr(err, errlen, "%s: missing key tokenizer.ggml.model", path);
        goto fail;
    }
    if (strcmp(model, "gpt2") == 0) {
        t->algo = ALGO_BPE;
        t->byte_level = true;
    } else if (strcmp(model, "llama") == 0) {
        t->algo = ALGO_SPM;
        t->escape_spaces = true;
        t->byte_fallback = true;
        t->add_space_prefix = true;
        t->add_bos = true;
    } else {
        eng_seterr(err, errlen, "%s: tokenizer.ggml.model is '%s'; supported: gpt2 (byte-level BPE), "
               "llama (SentencePiece)", path, model);
        goto fail;
    }

    const eng_gguf_kv *tokens = gguf_array(g, "tokenizer.ggml.tokens", true, true, &failed, err, errlen);
    if (failed) goto fail;
    if (tokens->arr_len == 0 || tokens->arr_len > INT32_MAX / 2) {
        eng_seterr(err, errlen, "%s: tokenizer.ggml.tokens has %llu entries", path,
               (unsigned long long) tokens->arr_len);
        goto fail;
    }
    const int n = (int) tokens->arr_len;
    if (tok_alloc(t, n, err, errlen) < 0) goto fail;
    src = malloc((size_t) n * sizeof(*src));
    if (!src) {
        eng_seterr(err, errlen, "%s: out of memory", path);
        goto fail;
    }
    gguf_strings(tokens, src, (uint64_t) n);
    if (tok_set_texts(t, src, path, err, errlen) < 0) goto fail;

    const eng_gguf_kv *scores = gguf_array(g, "tokenizer.ggml.scores", false, false, &failed, err, errlen);
    const eng_gguf_kv *types = gguf_array(g, "tokenizer.ggml.token_type", false, false, &failed, err, errlen);
    if (failed) goto fail;
    if ((scores && scores->arr_len < (uint64_t) n) || (types && types->arr_len < (uint64_t) n)) {
        eng_seterr(err, errlen, "%s: tokenizer.ggml.%s has %llu entries, expected %d", path,
               scores && scores->arr_len < (uint64_t) n ? "scores" : "token_type",
               (unsigned long long) (scores && scores->arr_len < (uint64_t) n ? scores->arr_len
                                                                           : types->arr_len), n);
        goto fail;
    }
    for (int i = 0; i < n; i++) {
        if (scores) t->score[i] = (float) eng_gguf_arr_float(scores, (uint64_t) i);
        if (types) {
            int64_t ty = eng_gguf_arr_int(types, (uint64_t) i);
            t->type[i] = (uint8_t) (ty >= TT_NORMAL && ty <= TT_BYTE ? ty : TT_UNDEFINED);
        }
    }

    if (t->algo == ALGO_SPM) {
        /* llama.cpp's defaults for SentencePiece vocabularies */
        t->unk = 0;
        t->bos = n > 1 ? 1 : -1;
        t->eos = n > 2 ? 2 : -1;
    }
    static const char *const id_keys[] = {
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id", "tokenizer.ggml.padding_token_id",
    };
    int32_t *id_dst[] = {&t->bos, &t->eos, &t->unk, &t->eot, &t->eom, &t->pad};
    for (size_t k = 0; k < 6; k++) gguf_special_id(g, id_keys[k], n, id_dst[k]);

    if (t->algo == ALGO_BPE) {
        rc = eng_gguf_get_str(g, "tokenizer.ggml.pre", &pre, err, errlen);
        if (rc < 0) goto fail;
        if (rc > 0) {
            fprintf(stderr, "kvserve: %s: no tokenizer.ggml.pre; using the 'default' "
                    "pre-tokenizer (tokenization may differ from the model's)\n", path);
        }
        const pre_entry *pe = pre_find(pre ? pre : "default");
        if (!pe) {
            eng_seterr(err, errlen, "%s: tokenizer.ggml.pre is '%s', a pre-tokenizer kvserve does not "
                   "know; it would split text differently from the model, so it is refused", path, pre);
            goto fail;
        }
        for (int k = 0; pe->patterns[k]; k++) {
            if (tok_add_stage(t, pe->patterns[k], false, path, err, errlen) < 0) goto fail;
        }
        t->ignore_merges = pe->ignore_merges;
        t->add_bos = pe->add_bos;

        const eng_gguf_kv *merges = gguf_array(g, "tokenizer.ggml.merges", true, true, &failed, err, errlen);
        if (failed) goto fail;
        size_t nm = (size_t) merges->arr_len;
        srcstr *msrc = malloc((nm ? nm : 1) * sizeof(*msrc));
        if (!msrc) {
            eng_seterr(err, errlen, "%s: out of memory", path);
            goto fail;
        }
        gguf_strings(merges, msrc, nm);
        size_t maxlen = 0;
        for (size_t i = 0; i < nm; i++) maxlen = msrc[i].len > maxlen ? msrc[i].len : maxlen;
        mbuf = malloc(maxlen + 1);
        if (!mbuf || tok_alloc_merges(t, nm, err, errlen) < 0) {
            free(msrc);
            eng_seterr(err, errlen, "%s: out of memory", path);
            goto fail;
        }
        for (size_t i = 0; i < nm; i++) {
            const char *s = msrc[i].ptr;
            size_t len = msrc[i].len;
            const char *sp = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL;
            if (!sp) continue;
            size_t na = (size_t) (sp - s);
            tok_add_merge(t, s, na, sp + 1, len - na - 1, (int32_t) i, mbuf);
        }
        free(msrc);
    } else {
        if (gguf_bool(g, "tokenizer.ggml.add_space_prefix", &t->add_space_prefix, err, errlen) < 0) {
            goto fail;
        }
    }
    if (gguf_bool(g, "tokenizer.ggml.add_bos_token", &t->add_bos, err, errlen) < 0) goto fail;
    rc = eng_gguf_get_str(g, "tokenizer.chat_template", &t->chat_template, err, errlen);
    if (rc < 0) goto fail;

    /* llama.cpp's rule for Phi-3: its added tokens eat the whitespace after them */
    rc = eng_gguf_get_str(g, "general.name", &name, err, errlen);
    if (rc < 0) goto fail;
    if (name) {
        for (char *c = name; *c; c++) *c = (char) tolower((unsigned char) *c);
        if (strstr(name, "phi-3") || strstr(name, "phi3")) {
            for (int i = 0; i < n; i++) {
                size_t len;
                const char *s = tok_text(t, i, &len);
                bool keep = (len == 5 && !memcmp(s, "<unk>", 5)) || (len == 3 && !memcmp(s, "<s>", 3)) ||
                            (len == 13 && !memcmp(s, "<|endoftext|>", 13));
                if ((is_special_type(t->type[i]) || (len == 4 && !memcmp(s, "</s>", 4))) && !keep) {
                    t->flags[i] |= TF_RSTRIP;
                }
            }
        }
    }
    if (tok_finish(t, err, errlen) < 0) goto fail;
    free(model);
    free(pre);
    free(name);
    free(src);
    free(mbuf);
    return t;
fail:
    free(model);
    free(pre);
    free(name);
    free(src);
    free(mbuf);
    eng_tokenizer_free(t);
    return NULL;
}

/* ---- loading from a Hugging Face directory --------------------------------- */

static char *read_file(const char *path, size_t *len_out, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        eng_seterr(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (len < cap) break;
        char *nb = realloc(buf, cap * 2);
        if (!nb) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = nb;
        cap *= 2;
    }
    bool bad = ferror(f);
    fclose(f);
    if (!buf || bad) {
        free(buf);
        eng_seterr(err, errlen, "%s: %s", path, bad ? "read error" : "out of memory");
        return NULL;
    }
    *len_out = len;
    return buf;
}

static json_t *load_json(const char *path, char *err, size_t errlen) {
    json_error_t je;
    json_t *root = json_load_file(path, JSON_ALLOW_NUL, &je);
    if (!root) eng_seterr(err, errlen, "%s:%d:%d: %s", path, je.line, je.column, je.text);
    return root;
}

static bool file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

/* A token named in tokenizer_config.json: "text" or {"content": "text"}. */
static const char *config_token_text(json_t *v) {
    if (json_is_string(v)) return json_string_value(v);
    if (json_is_object(v)) return json_string_value(json_object_get(v, "content"));
    return NULL;
}

/* Adds a pre-tokenizer split for a literal string (Split with a String pattern). */
static int add_literal_stage(eng_tokenizer *t, const char *lit, bool drop, const char *what,
                             char *err, size_t errlen) {
    size_t n = strlen(lit);
    char *pat = malloc(2 * n + 1);
    if (!pat) {
        eng_seterr(err, errlen, "%s: out of memory", what);
        return -1;
    }
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (strchr("\\^$.|?*+()[]{}", lit[i])) pat[m++] = '\\';
        pat[m++] = lit[i];
    }
    pat[m] = '\0';
    int rc = tok_add_stage(t, pat, drop, what, err, errlen);
    free(pat);
    return rc;
}

static int hf_normalizer(eng_tokenizer *t, json_t *nz, const char *what, char *err, size_t errlen) {
    if (!nz || json_is_null(nz)) return 0;
    const char *type = json_string_value(json_object_get(nz, "type"));
    if (!type) type = "";
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(nz, "normalizers");
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v) {
            if (hf_normalizer(t, v, what, err, errlen) < 0) return -1;
        }
        return 0;
    }
    if (strcmp(type, "Prepend") == 0) {
        const char *s = json_string_value(json_object_get(nz, "prepend"));
        if (s && strcmp(s, "\xE2\x96\x81") == 0) {
            t->add_space_prefix = true;
            return 0;
        }
    } else if (strcmp(type, "Replace") == 0) {
        const char *pat = json_string_value(json_object_get(json_object_get(nz, "pattern"), "String"));
        const char *content = json_string_value(json_object_get(nz, "content"));
        if (pat && content && strcmp(pat, " ") == 0 && strcmp(content, "\xE2\x96\x81") == 0) {
            t->escape_spaces = true;
            return 0;
        }
    } else if (strcmp(type, "NFC") == 0) {
        return 0;   /* not applied (as in llama.cpp); text is nearly always NFC already */
    }
    eng_seterr(err, errlen, "%s: normalizer %s is not supported (only Prepend(U+2581), "
           "Replace(' ' -> U+2581), NFC and Sequence of them)", what, type);
    return -1;
}

static int hf_pre_tokenizer(eng_tokenizer *t, json_t *pt, const char *what, char *err, size_t errlen) {
    if (!pt || json_is_null(pt)) return 0;
    const char *type = json_string_value(json_object_get(pt, "type"));
    if (!type) type = "";
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(pt, "pretokenizers");
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v) {
            if (hf_pre_tokenizer(t, v, what, err, errlen) < 0) return -1;
        }
        return 0;
    }
    if (strcmp(type, "ByteLevel") == 0) {
        t->byte_level = true;
        if (json_is_true(json_object_get(pt, "add_prefix_space"))) t->add_space_prefix = true;
        json_t *use_regex = json_object_get(pt, "use_regex");
        if (!use_regex || json_is_true(use_regex)) {
            return tok_add_stage(t, RX_GPT2, false, what, err, errlen);
        }
        return 0;
    }
    if (strcmp(type, "Split") == 0) {
        json_t *pattern = json_object_get(pt, "pattern");
        const char *behavior = json_string_value(json_object_get(pt, "behavior"));
        bool drop = behavior && strcmp(behavior, "Removed") == 0;
        if (!behavior || (!drop && strcmp(behavior, "Isolated") != 0) ||
            json_is_true(json_object_get(pt, "invert"))) {
            eng_seterr(err, errlen, "%s: Split pre-tokenizer with behavior %s%s is not supported "
                   "(only Isolated and Removed)", what, behavior ? behavior : "(none)",
                   json_is_true(json_object_get(pt, "invert")) ? " and invert" : "");
            return -1;
        }
        const char *rx = json_string_value(json_object_get(pattern, "Regex"));
        if (rx) return tok_add_stage(t, rx, drop, what, err, errlen);
        const char *lit = json_string_value(json_object_get(pattern, "String"));
        if (lit) return add_literal_stage(t, lit, drop, what, err, errlen);
        eng_seterr(err, errlen, "%s: Split pre-tokenizer without a Regex or String pattern", what);
        return -1;
    }
    if (strcmp(type, "Digits") == 0) {
        bool each = json_is_true(json_object_get(pt, "individual_digits"));
        return tok_add_stage(t, each ? "\\p{N}" : "\\p{N}+", false, what, err, errlen);
    }
    if (strcmp(type, "Metaspace") == 0) {
        const char *rep = json_string_value(json_object_get(pt, "replacement"));
        if (rep && strcmp(rep, "\xE2\x96\x81") != 0) {
            eng_seterr(err, errlen, "%s: Metaspace with replacement '%s' is not supported", what, rep);
            return -1;
        }
        t->escape_spaces = true;
        const char *scheme = json_string_value(json_object_get(pt, "prepend_scheme"));
        json_t *aps = json_object_get(pt, "add_prefix_space");
        t->add_space_prefix = scheme ? strcmp(scheme, "never") != 0 : (!aps || json_is_true(aps));
        t->prefix_first_only = scheme && strcmp(scheme, "first") == 0;
        json_t *split = json_object_get(pt, "split");
        if (!split || json_is_true(split)) {
            return tok_add_stage(t, "\xE2\x96\x81[^\xE2\x96\x81]*|[^\xE2\x96\x81]+", false, what,
                                 err, errlen);
        }
        return 0;
    }
    eng_seterr(err, errlen, "%s: pre-tokenizer %s is not supported (ByteLevel, Split, Digits, "
           "Metaspace and Sequence are)", what, type);
    return -1;
}

/* The BOS a TemplateProcessing post-processor puts first, or NULL. */
static const char *hf_template_bos(json_t *pp) {
    if (!pp || json_is_null(pp)) return NULL;
    const char *type = json_string_value(json_object_get(pp, "type"));
    if (type && strcmp(type, "Sequence") == 0) {
        size_t i;
        json_t *v;
        json_array_foreach(json_object_get(pp, "processors"), i, v) {
            const char *s = hf_template_bos(v);
            if (s) return s;
        }
        return NULL;
    }
    if (!type || strcmp(type, "TemplateProcessing") != 0) return NULL;
    json_t *first = json_array_get(json_object_get(pp, "single"), 0);
    return json_string_value(json_object_get(json_object_get(first, "SpecialToken"), "id"));
}

/* Marks a token named by the config as special (control) if it was plain. */
static int32_t config_token(eng_tokenizer *t, json_t *v) {
    const char *s = config_token_text(v);
    if (!s || !*s) return -1;
    int32_t id = vocab_lookup(t, s, strlen(s));
    if (id >= 0 && t->type[id] == TT_NORMAL) t->type[id] = TT_CONTROL;
    return id;
}

static int hf_config(eng_tokenizer *t, const char *dir, const char *tmpl_bos, char *err, size_t errlen) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
    if (tmpl_bos) {
        /* the post-processor prepends this token: it is the BOS */
        int32_t id = vocab_lookup(t, tmpl_bos, strlen(tmpl_bos));
        if (id >= 0) {
            t->bos = id;
            t->add_bos = true;
        }
    }
    if (!file_exists(path)) return 0;
    json_t *cfg = load_json(path, err, errlen);
    if (!cfg) return -1;
    if (!json_is_object(cfg)) {
        eng_seterr(err, errlen, "%s: expected a JSON object", path);
        json_decref(cfg);
        return -1;
    }
    int32_t id;
    if ((id = config_token(t, json_object_get(cfg, "bos_token"))) >= 0) t->bos = id;
    if ((id = config_token(t, json_object_get(cfg, "eos_token"))) >= 0) t->eos = id;
    if ((id = config_token(t, json_object_get(cfg, "pad_token"))) >= 0) t->pad = id;
    if ((id = config_token(t, json_object_get(cfg, "unk_token"))) >= 0 && t->unk < 0) t->unk = id;
    json_t *ab = json_object_get(cfg, "add_bos_token");
    if (json_is_boolean(ab)) t->add_bos = json_is_true(ab);
    json_t *ct = json_object_get(cfg, "chat_template");
    const char *tmpl = json_string_value(ct);
    if (json_is_array(ct)) {
        size_t i;
        json_t *v;
        json_array_foreach(ct, i, v) {
            const char *nm = json_string_value(json_object_get(v, "name"));
            if (!tmpl || (nm && strcmp(nm, "default") == 0)) {
                tmpl = json_string_value(json_object_get(v, "template"));
            }
        }
    }
    if (tmpl) {
        t->chat_template = strdup(tmpl);
        if (!t->chat_template) {
            eng_seterr(err, errlen, "%s: out of memory", path);
            json_decref(cfg);
            return -1;
        }
    }
    json_decref(cfg);
    return 0;
}

/* Adds the merges of a JSON array ("a b" strings or [a, b] pairs). */
static int hf_merges_json(eng_tokenizer *t, json_t *merges, const char *what, char *err, size_t errlen) {
    size_t nm = json_array_size(merges);
    if (tok_alloc_merges(t, nm, err, errlen) < 0) return -1;
    size_t i;
    json_t *m;
    char *buf = NULL;
    size_t cap = 0;
    json_array_foreach(merges, i, m) {
        const char *a, *b;
        size_t na, nb;
        if (json_is_string(m)) {
            const char *s = json_string_value(m);
            size_t len = json_string_length(m);
            const char *sp = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL;
            if (!sp) {
                eng_seterr(err, errlen, "%s: merge %zu '%s' has no space", what, i, s);
                free(buf);
                return -1;
            }
            a = s;
            na = (size_t) (sp - s);
            b = sp + 1;
            nb = len - na - 1;
        } else if (json_is_array(m) && json_array_size(m) == 2 &&
                   json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            na = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            nb = json_string_length(json_array_get(m, 1));
        } else {
            eng_seterr(err, errlen, "%s: merge %zu is neither \"a b\" nor [a, b]", what, i);
            free(buf);
            return -1;
        }
        if (na + nb > cap) {
            cap = (na + nb) * 2;
            char *nbuf = realloc(buf, cap);
            if (!nbuf) {
                free(buf);
                eng_seterr(err, errlen, "%s: out of memory", what);
                return -1;
            }
            buf = nbuf;
        }
        tok_add_merge(t, a, na, b, nb, (int32_t) i, buf);
    }
    free(buf);
    return 0;
}

/* Sizes the vocabulary from a {text: id} object plus extra ids, and fills src. */
static int hf_vocab(eng_tokenizer *t, json_t *vocab, json_t *added, srcstr **src_out,
                    const char *what, char *err, size_t errlen) {
    if (!json_is_object(vocab)) {
        eng_seterr(err, errlen, "%s: model.vocab is not an object", what);
        return -1;
    }
    json_int_t max_id = -1;
    const char *key;
    json_t *v;
    json_object_foreach(vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= INT32_MAX / 2) {
            eng_seterr(err, errlen, "%s: vocab entry '%.40s' has no valid id", what, key);
            return -1;
        }
        if (json_integer_value(v) > max_id) max_id = json_integer_value(v);
    }
    size_t i;
    json_array_foreach(added, i, v) {
        json_t *id = json_object_get(v, "id");
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= INT32_MAX / 2 ||
            !json_is_string(json_object_get(v, "content"))) {
            eng_seterr(err, errlen, "%s: added_tokens[%zu] needs an id and a content", what, i);
            return -1;
        }
        if (json_integer_value(id) > max_id) max_id = json_integer_value(id);
    }
    if (max_id < 0) {
        eng_seterr(err, errlen, "%s: empty vocabulary", what);
        return -1;
    }
    int n = (int) max_id + 1;
    if (tok_alloc(t, n, err, errlen) < 0) return -1;
    srcstr *src = calloc((size_t) n, sizeof(*src));
    if (!src) {
        eng_seterr(err, errlen, "%s: out of memory", what);
        return -1;
    }
    json_object_foreach(vocab, key, v) {
        int id = (int) json_integer_value(v);
        if (src[id].ptr) {
            eng_seterr(err, errlen, "%s: id %d is given to both '%.40s' and '%.40s'", what, id, src[id].ptr, key);
            free(src);
            return -1;
        }
        src[id].ptr = key;
        src[id].len = strlen(key);
    }
    json_array_foreach(added, i, v) {
        int id = (int) json_integer_value(json_object_get(v, "id"));
        json_t *content = json_object_get(v, "content");
        src[id].ptr = json_string_value(content);
        src[id].len = json_string_length(content);
        t->type[id] = json_is_true(json_object_get(v, "special")) ? TT_CONTROL : TT_USER;
        if (json_is_true(json_object_get(v, "lstrip"))) t->flags[id] |= TF_LSTRIP;
        if (json_is_true(json_object_get(v, "rstrip"))) t->flags[id] |= TF_RSTRIP;
    }
    for (int k = 0; k < n; k++) {
        if (!src[k].ptr) {
            src[k].ptr = "";
            t->type[k] = TT_UNUSED;
        }
    }
    *src_out = src;
    return 0;
}

static int hf_tokenizer_json(eng_tokenizer *t, const char *path, const char **tmpl_bos, json_t *root,
                             char *err, size_t errlen) {
    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) {
        eng_seterr(err, errlen, "%s: no model object", path);
        return -1;
    }
    const char *mtype = json_string_value(json_object_get(model, "type"));
    if (mtype && strcmp(mtype, "BPE") != 0) {
        eng_seterr(err, errlen, "%s: model.type is %s; only BPE is supported", path, mtype);
        return -1;
    }
    static const char *const unsupported[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t k = 0; k < 2; k++) {
        const char *s = json_string_value(json_object_get(model, unsupported[k]));
        if (s && *s) {
            eng_seterr(err, errlen, "%s: model.%s is not supported", path, unsupported[k]);
            return -1;
        }
    }
    json_t *added = json_object_get(root, "added_tokens");
    srcstr *src = NULL;
    if (hf_vocab(t, json_object_get(model, "vocab"), added, &src, path, err, errlen) < 0) return -1;
    int rc = tok_set_texts(t, src, path, err, errlen);
    free(src);
    if (rc < 0) return -1;

    t->algo = ALGO_BPE;
    t->byte_fallback = json_is_true(json_object_get(model, "byte_fallback"));
    t->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));
    const char *unk = json_string_value(json_object_get(model, "unk_token"));
    if (unk) {
        t->unk = vocab_lookup(t, unk, strlen(unk));
        if (t->unk >= 0) t->type[t->unk] = TT_UNKNOWN;
    }
    if (t->byte_fallback) {
        for (int i = 0; i < t->n_vocab; i++) {
            size_t len;
            const char *s = tok_text(t, i, &len);
            if (t->type[i] == TT_NORMAL && parse_byte_token(s, len) >= 0) t->type[i] = TT_BYTE;
        }
    }
    if (hf_normalizer(t, json_object_get(root, "normalizer"), path, err, errlen) < 0 ||
        hf_pre_tokenizer(t, json_object_get(root, "pre_tokenizer"), path, err, errlen) < 0) {
        return -1;
    }
    if (t->byte_level && t->escape_spaces) {
        eng_seterr(err, errlen, "%s: a ByteLevel pre-tokenizer together with U+2581 spaces is not supported",
               path);
        return -1;
    }
    *tmpl_bos = hf_template_bos(json_object_get(root, "post_processor"));
    json_t *merges = json_object_get(model, "merges");
    if (!json_is_array(merges)) {
        eng_seterr(err, errlen, "%s: model.merges is not an array", path);
        return -1;
    }
    return hf_merges_json(t, merges, path, err, errlen);
}

/* GPT-2's original files: vocab.json ({text: id}) and merges.txt. */
static int hf_gpt2_files(eng_tokenizer *t, const char *dir, char *err, size_t errlen) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/vocab.json", dir);
    json_t *vocab = load_json(path, err, errlen);
    if (!vocab) return -1;
    srcstr *src = NULL;
    int rc = hf_vocab(t, vocab, NULL, &src, path, err, errlen);
    if (rc == 0) rc = tok_set_texts(t, src, path, err, errlen);
    free(src);
    json_decref(vocab);
    if (rc < 0) return -1;
    t->algo = ALGO_BPE;
    t->byte_level = true;
    if (tok_add_stage(t, RX_GPT2, false, path, err, errlen) < 0) return -1;
    int32_t eot = vocab_lookup(t, "<|endoftext|>", 13);
    if (eot >= 0) {
        t->type[eot] = TT_CONTROL;
        t->bos = t->eos = eot;
    }

    snprintf(path, sizeof(path), "%s/merges.txt", dir);
    size_t len;
    char *txt = read_file(path, &len, err, errlen);
    if (!txt) return -1;
    size_t n_lines = 1;
    for (size_t i = 0; i < len; i++) n_lines += txt[i] == '\n';
    char *buf = malloc(len + 1);
    rc = buf ? tok_alloc_merges(t, n_lines, err, errlen) : -1;
    int32_t rank = 0;
    for (size_t pos = 0; rc == 0 && pos < len;) {
        const char *line = txt + pos;
        const char *nl = memchr(line, '\n', len - pos);
        size_t ll = nl ? (size_t) (nl - line) : len - pos;
        pos += ll + 1;
        if (ll > 0 && line[ll - 1] == '\r') ll--;
        if (ll == 0 || (rank == 0 && ll >= 8 && memcmp(line, "#version", 8) == 0)) continue;
        const char *sp = ll > 1 ? memchr(line + 1, ' ', ll - 1) : NULL;
        if (!sp) {
            eng_seterr(err, errlen, "%s: line '%.*s' is not a merge", path, (int) (ll > 40 ? 40 : ll), line);
            rc = -1;
            break;
        }
        size_t na = (size_t) (sp - line);
        tok_add_merge(t, line, na, sp + 1, ll - na - 1, rank++, buf);
    }
    if (!buf) eng_seterr(err, errlen, "%s: out of memory", path);
    free(buf);
    free(txt);
    return rc;
}

eng_tokenizer *eng_tokenizer_from_hf_dir(const char *dir, char *err, size_t errlen) {
    eng_tokenizer *t = tok_new();
    if (!t) {
        eng_seterr(err, errlen, "%s: out of memory", dir);
        return NULL;
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    const char *tmpl_bos = NULL;
    json_t *root = NULL;
    int rc;
    if (file_exists(path)) {
        root = load_json(path, err, errlen);
        rc = root ? hf_tokenizer_json(t, path, &tmpl_bos, root, err, errlen) : -1;
    } else {
        char vpath[4096];
        snprintf(vpath, sizeof(vpath), "%s/vocab.json", dir);
        if (!file_exists(vpath)) {
            eng_seterr(err, errlen, "%s: no tokenizer.json, nor vocab.json with merges.txt", dir);
            eng_tokenizer_free(t);
            return NULL;
        }
        rc = hf_gpt2_files(t, dir, err, errlen);
    }
    if (rc == 0) rc = hf_config(t, dir, tmpl_bos, err, errlen);
    json_decref(root);   /* tmpl_bos points into root: used above */
    if (rc == 0) rc = tok_finish(t, err, errlen);
    if (rc < 0) {
        eng_tokenizer_free(t);
        return NULL;
    }
    return t;
}

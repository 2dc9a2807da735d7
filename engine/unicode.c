/* unicode.c: UTF-8 coding, the White_Space property and the split-pattern
 * regex engine used by the tokenizer's pre-tokenizers (see unicode.h).
 *
 * The regex engine: a pattern is parsed into a small syntax tree, compiled to
 * a program for a backtracking VM (CHAR, CLASS, SPLIT, JMP, LOOK, MATCH...),
 * and run leftmost-first like Oniguruma, which Hugging Face tokenizers uses.
 * Each (instruction, position) state that failed is remembered in a bitmap
 * (RE2's "bit state" idea: without captures, a state that failed once fails
 * again, whatever start position reached it), so patterns like \s+$ that
 * backtrack a lot stay linear in practice instead of quadratic. The bitmap
 * covers a window of positions that follows the search, so memory does not
 * grow with the text. Lookahead bodies must have bounded length; they run
 * without memo. */
#include "engine/unicode.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- properties and UTF-8 ---------------------------------------------- */

bool eng_unicode_is_space(uint32_t cp) {
    if (cp < 0x80) {
        return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20;
    }
    switch (cp) {
    case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029: case 0x202F:
    case 0x205F: case 0x3000:
        return true;
    default:
        return cp >= 0x2000 && cp <= 0x200A;
    }
}

int eng_utf8_lead_len(unsigned char b) {
    if (b < 0x80) return 1;
    if (b < 0xC2) return 0;
    if (b < 0xE0) return 2;
    if (b < 0xF0) return 3;
    if (b < 0xF5) return 4;
    return 0;
}

uint32_t eng_utf8_decode(const char *str, size_t len, size_t *n) {
    const unsigned char *s = (const unsigned char *) str;
    unsigned char b0 = s[0];
    int need = eng_utf8_lead_len(b0);
    *n = 1;
    if (need == 1) return b0;
    if (need == 0 || (size_t) need > len) return ENG_UTF8_BAD_BASE + b0;
    /* the second byte's valid range depends on the lead (no overlongs,
     * no surrogates, nothing above U+10FFFF) */
    unsigned char lo = 0x80, hi = 0xBF;
    if (b0 == 0xE0) lo = 0xA0;
    else if (b0 == 0xED) hi = 0x9F;
    else if (b0 == 0xF0) lo = 0x90;
    else if (b0 == 0xF4) hi = 0x8F;
    if (s[1] < lo || s[1] > hi) return ENG_UTF8_BAD_BASE + b0;
    uint32_t cp;
    if (need == 2) {
        cp = ((uint32_t) (b0 & 0x1F) << 6) | (s[1] & 0x3F);
    } else if (need == 3) {
        if ((s[2] & 0xC0) != 0x80) return ENG_UTF8_BAD_BASE + b0;
        cp = ((uint32_t) (b0 & 0x0F) << 12) | ((uint32_t) (s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    } else {
        if ((s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80) return ENG_UTF8_BAD_BASE + b0;
        cp = ((uint32_t) (b0 & 0x07) << 18) | ((uint32_t) (s[1] & 0x3F) << 12) |
             ((uint32_t) (s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    }
    *n = (size_t) need;
    return cp;
}

int eng_utf8_encode(uint32_t cp, char out[4]) {
    if (cp < 0x80) {
        out[0] = (char) cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char) (0xC0 | (cp >> 6));
        out[1] = (char) (0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char) (0xE0 | (cp >> 12));
        out[1] = (char) (0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char) (0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char) (0xF0 | (cp >> 18));
    out[1] = (char) (0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char) (0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char) (0x80 | (cp & 0x3F));
    return 4;
}

int eng_spans_push(eng_spans *s, uint32_t start, uint32_t end) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        eng_span *v = realloc(s->v, cap * sizeof(*v));
        if (!v) return -1;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n].start = start;
    s->v[s->n].end = end;
    s->n++;
    return 0;
}

/* ---- regex: character classes ------------------------------------------ */

enum {
    CF_SPACE = 1, CF_NOTSPACE = 2, CF_WORD = 4, CF_NOTWORD = 8, CF_ANY_BUT_NL = 16
};

#define MAX_NEG_MASKS 4

typedef struct {
    uint64_t ascii[2];        /* final membership of cp < 128 */
    uint32_t cat_mask;        /* categories in the set */
    uint32_t neg_masks[MAX_NEG_MASKS]; /* \P{..} items: cp in set if its category is NOT in one */
    int n_neg_masks;
    unsigned flags;           /* CF_* items */
    uint32_t *ranges;         /* (n_ranges, 2) inclusive [lo, hi] */
    int n_ranges, cap_ranges;
    bool negated, icase;
} uclass;

static bool is_word_cp(uint32_t cp) {
    if (cp < 0x80) {
        return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') ||
               (cp >= 'A' && cp <= 'Z') || cp == '_';
    }
    /* Oniguruma's \w: alphabetic (letters, letter numbers), marks, decimal
     * digits and connector punctuation */
    uint32_t bit = ENG_UCAT_BIT(eng_unicode_category(cp));
    return (bit & (ENG_UCAT_MASK_L | ENG_UCAT_MASK_M | ENG_UCAT_BIT(ENG_UCAT_ND) |
                   ENG_UCAT_BIT(ENG_UCAT_NL) | ENG_UCAT_BIT(ENG_UCAT_PC))) != 0;
}

static bool class_items_match(const uclass *c, uint32_t cp) {
    uint32_t bit = ENG_UCAT_BIT(eng_unicode_category(cp));
    if (c->cat_mask & bit) return true;
    for (int i = 0; i < c->n_neg_masks; i++) {
        if (!(c->neg_masks[i] & bit)) return true;
    }
    if (c->flags) {
        if ((c->flags & CF_SPACE) && eng_unicode_is_space(cp)) return true;
        if ((c->flags & CF_NOTSPACE) && !eng_unicode_is_space(cp)) return true;
        if ((c->flags & CF_WORD) && is_word_cp(cp)) return true;
        if ((c->flags & CF_NOTWORD) && !is_word_cp(cp)) return true;
        if ((c->flags & CF_ANY_BUT_NL) && cp != '\n') return true;
    }
    for (int i = 0; i < c->n_ranges; i++) {
        if (cp >= c->ranges[2 * i] && cp <= c->ranges[2 * i + 1]) return true;
    }
    return false;
}

static bool class_match_slow(const uclass *c, uint32_t cp) {
    bool in = class_items_match(c, cp);
    if (!in && c->icase && cp < 0x80 &&
        ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z'))) {
        in = class_items_match(c, cp ^ 0x20);
    }
    return in != c->negated;
}

static inline bool class_match(const uclass *c, uint32_t cp) {
    if (cp < 128) return (c->ascii[cp >> 6] >> (cp & 63)) & 1;
    return class_match_slow(c, cp);
}

static void class_finish(uclass *c) {
    c->ascii[0] = c->ascii[1] = 0;
    for (uint32_t cp = 0; cp < 128; cp++) {
        if (class_match_slow(c, cp)) c->ascii[cp >> 6] |= 1ull << (cp & 63);
    }
}

/* ---- regex: syntax tree ------------------------------------------------- */

enum {
    N_EMPTY, N_CLASS, N_CAT, N_ALT, N_REP, N_LOOK, N_BOL, N_EOL, N_WORDB, N_NWORDB
};

typedef struct rnode {
    int type;
    int cls;                 /* N_CLASS: class index */
    int min, max;            /* N_REP: max < 0 is unbounded */
    bool greedy;             /* N_REP */
    bool neg;                /* N_LOOK */
    struct rnode **kids;     /* N_CAT, N_ALT: children; N_REP, N_LOOK: kids[0] */
    int n_kids, cap_kids;
} rnode;

/* ---- regex: program ----------------------------------------------------- */

enum { OP_CLASS, OP_SPLIT, OP_JMP, OP_LOOK, OP_BOL, OP_EOL, OP_WORDB, OP_NWORDB, OP_MATCH };

typedef struct {
    uint8_t op;
    uint8_t neg;     /* OP_LOOK: negative lookahead */
    uint32_t x, y;   /* CLASS: class; SPLIT: preferred x, other y; JMP: x;
                        LOOK: body starts at pc + 1, continue at x */
} rinst;

struct eng_uregex {
    rinst *prog;
    uint32_t n_prog, cap_prog;
    uclass *classes;
    int n_classes, cap_classes;
};

#define MAX_PROG 20000
#define MAX_REPEAT 1000

typedef struct {
    const char *pat;
    size_t pos;
    eng_uregex *re;
    bool icase;
    char *err;
    size_t errlen;
    bool failed;
} rparser;

static void perr(rparser *p, const char *fmt, ...) {
    if (p->failed) return;
    p->failed = true;
    char msg[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (p->err && p->errlen) {
        snprintf(p->err, p->errlen, "regex /%.80s%s/: %s at offset %zu", p->pat,
                 strlen(p->pat) > 80 ? "..." : "", msg, p->pos);
    }
}

static rnode *node_new(rparser *p, int type) {
    rnode *n = calloc(1, sizeof(*n));
    if (!n) perr(p, "out of memory");
    else n->type = type;
    return n;
}

static void node_free(rnode *n) {
    if (!n) return;
    for (int i = 0; i < n->n_kids; i++) node_free(n->kids[i]);
    free(n->kids);
    free(n);
}

static bool node_add(rparser *p, rnode *n, rnode *kid) {
    if (!kid) return false;
    if (n->n_kids == n->cap_kids) {
        int cap = n->cap_kids ? n->cap_kids * 2 : 4;
        rnode **k = realloc(n->kids, (size_t) cap * sizeof(*k));
        if (!k) {
            node_free(kid);
            perr(p, "out of memory");
            return false;
        }
        n->kids = k;
        n->cap_kids = cap;
    }
    n->kids[n->n_kids++] = kid;
    return true;
}

static int class_new(rparser *p) {
    eng_uregex *re = p->re;
    if (re->n_classes == re->cap_classes) {
        int cap = re->cap_classes ? re->cap_classes * 2 : 16;
        uclass *c = realloc(re->classes, (size_t) cap * sizeof(*c));
        if (!c) {
            perr(p, "out of memory");
            return -1;
        }
        re->classes = c;
        re->cap_classes = cap;
    }
    uclass *c = &re->classes[re->n_classes];
    memset(c, 0, sizeof(*c));
    c->icase = p->icase;
    return re->n_classes++;
}

static void class_add_range(rparser *p, int ci, uint32_t lo, uint32_t hi) {
    uclass *c = &p->re->classes[ci];
    if (c->n_ranges == c->cap_ranges) {
        int cap = c->cap_ranges ? c->cap_ranges * 2 : 4;
        uint32_t *r = realloc(c->ranges, (size_t) cap * 2 * sizeof(*r));
        if (!r) {
            perr(p, "out of memory");
            return;
        }
        c->ranges = r;
        c->cap_ranges = cap;
    }
    c->ranges[2 * c->n_ranges] = lo;
    c->ranges[2 * c->n_ranges + 1] = hi;
    c->n_ranges++;
}

/* A unicode property name after \p{ or \P{: its category mask, 0 if unknown. */
static uint32_t property_mask(const char *name, size_t len) {
    static const struct { const char *name; uint32_t mask; } props[] = {
        {"L", ENG_UCAT_MASK_L}, {"Letter", ENG_UCAT_MASK_L},
        {"Lu", ENG_UCAT_BIT(ENG_UCAT_LU)}, {"Ll", ENG_UCAT_BIT(ENG_UCAT_LL)},
        {"Lt", ENG_UCAT_BIT(ENG_UCAT_LT)}, {"Lm", ENG_UCAT_BIT(ENG_UCAT_LM)},
        {"Lo", ENG_UCAT_BIT(ENG_UCAT_LO)},
        {"LC", ENG_UCAT_BIT(ENG_UCAT_LU) | ENG_UCAT_BIT(ENG_UCAT_LL) | ENG_UCAT_BIT(ENG_UCAT_LT)},
        {"L&", ENG_UCAT_BIT(ENG_UCAT_LU) | ENG_UCAT_BIT(ENG_UCAT_LL) | ENG_UCAT_BIT(ENG_UCAT_LT)},
        {"M", ENG_UCAT_MASK_M}, {"Mark", ENG_UCAT_MASK_M},
        {"Mn", ENG_UCAT_BIT(ENG_UCAT_MN)}, {"Mc", ENG_UCAT_BIT(ENG_UCAT_MC)},
        {"Me", ENG_UCAT_BIT(ENG_UCAT_ME)},
        {"N", ENG_UCAT_MASK_N}, {"Number", ENG_UCAT_MASK_N},
        {"Nd", ENG_UCAT_BIT(ENG_UCAT_ND)}, {"Nl", ENG_UCAT_BIT(ENG_UCAT_NL)},
        {"No", ENG_UCAT_BIT(ENG_UCAT_NO)},
        {"P", ENG_UCAT_BIT(ENG_UCAT_PC) | ENG_UCAT_BIT(ENG_UCAT_PD) | ENG_UCAT_BIT(ENG_UCAT_PS) |
              ENG_UCAT_BIT(ENG_UCAT_PE) | ENG_UCAT_BIT(ENG_UCAT_PI) | ENG_UCAT_BIT(ENG_UCAT_PF) |
              ENG_UCAT_BIT(ENG_UCAT_PO)},
        {"Pc", ENG_UCAT_BIT(ENG_UCAT_PC)}, {"Pd", ENG_UCAT_BIT(ENG_UCAT_PD)},
        {"Ps", ENG_UCAT_BIT(ENG_UCAT_PS)}, {"Pe", ENG_UCAT_BIT(ENG_UCAT_PE)},
        {"Pi", ENG_UCAT_BIT(ENG_UCAT_PI)}, {"Pf", ENG_UCAT_BIT(ENG_UCAT_PF)},
        {"Po", ENG_UCAT_BIT(ENG_UCAT_PO)},
        {"S", ENG_UCAT_BIT(ENG_UCAT_SM) | ENG_UCAT_BIT(ENG_UCAT_SC) | ENG_UCAT_BIT(ENG_UCAT_SK) |
              ENG_UCAT_BIT(ENG_UCAT_SO)},
        {"Sm", ENG_UCAT_BIT(ENG_UCAT_SM)}, {"Sc", ENG_UCAT_BIT(ENG_UCAT_SC)},
        {"Sk", ENG_UCAT_BIT(ENG_UCAT_SK)}, {"So", ENG_UCAT_BIT(ENG_UCAT_SO)},
        {"Z", ENG_UCAT_BIT(ENG_UCAT_ZS) | ENG_UCAT_BIT(ENG_UCAT_ZL) | ENG_UCAT_BIT(ENG_UCAT_ZP)},
        {"Zs", ENG_UCAT_BIT(ENG_UCAT_ZS)}, {"Zl", ENG_UCAT_BIT(ENG_UCAT_ZL)},
        {"Zp", ENG_UCAT_BIT(ENG_UCAT_ZP)},
        {"C", ENG_UCAT_BIT(ENG_UCAT_CC) | ENG_UCAT_BIT(ENG_UCAT_CF) | ENG_UCAT_BIT(ENG_UCAT_CS) |
              ENG_UCAT_BIT(ENG_UCAT_CO) | ENG_UCAT_BIT(ENG_UCAT_CN)},
        {"Cc", ENG_UCAT_BIT(ENG_UCAT_CC)}, {"Cf", ENG_UCAT_BIT(ENG_UCAT_CF)},
        {"Cs", ENG_UCAT_BIT(ENG_UCAT_CS)}, {"Co", ENG_UCAT_BIT(ENG_UCAT_CO)},
        {"Cn", ENG_UCAT_BIT(ENG_UCAT_CN)},
    };
    for (size_t i = 0; i < sizeof(props) / sizeof(props[0]); i++) {
        if (strlen(props[i].name) == len && memcmp(props[i].name, name, len) == 0) {
            return props[i].mask;
        }
    }
    return 0;
}

static uint32_t parse_hex(rparser *p, int min_digits, int max_digits) {
    uint32_t v = 0;
    int n = 0;
    while (n < max_digits) {
        char ch = p->pat[p->pos];
        int d;
        if (ch >= '0' && ch <= '9') d = ch - '0';
        else if (ch >= 'a' && ch <= 'f') d = ch - 'a' + 10;
        else if (ch >= 'A' && ch <= 'F') d = ch - 'A' + 10;
        else break;
        v = v * 16 + (uint32_t) d;
        p->pos++;
        n++;
    }
    if (n < min_digits || v >= 0x110000) perr(p, "bad hex escape");
    return v;
}

/* Reads one literal code point of the pattern (UTF-8). */
static uint32_t read_cp(rparser *p) {
    size_t n;
    const char *s = p->pat + p->pos;
    uint32_t cp = eng_utf8_decode(s, strlen(s), &n);
    if (cp >= 0x110000) perr(p, "invalid UTF-8 in pattern");
    p->pos += n;
    return cp;
}

/* Parses an escape after '\' (p->pos at the letter). Either adds a class item
 * to class ci (when the escape is a set: \s \d \w \p{..}) and returns
 * UINT32_MAX, or returns the literal code point. */
static uint32_t parse_escape(rparser *p, int ci) {
    char e = p->pat[p->pos];
    if (!e) {
        perr(p, "trailing backslash");
        return 0;
    }
    p->pos++;
    uclass *c = &p->re->classes[ci];
    switch (e) {
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    case 'f': return '\f';
    case 'v': return '\v';
    case 'a': return 7;
    case 'e': return 27;
    case '0': return 0;
    case 'x':
        if (p->pat[p->pos] == '{') {
            p->pos++;
            uint32_t v = parse_hex(p, 1, 6);
            if (p->pat[p->pos] != '}') perr(p, "missing } in \\x{...}");
            p->pos++;
            return v;
        }
        return parse_hex(p, 2, 2);
    case 'u': return parse_hex(p, 4, 4);
    case 's': c->flags |= CF_SPACE; return UINT32_MAX;
    case 'S': c->flags |= CF_NOTSPACE; return UINT32_MAX;
    case 'w': c->flags |= CF_WORD; return UINT32_MAX;
    case 'W': c->flags |= CF_NOTWORD; return UINT32_MAX;
    case 'd': c->cat_mask |= ENG_UCAT_BIT(ENG_UCAT_ND); return UINT32_MAX;
    case 'D':
        if (c->n_neg_masks == MAX_NEG_MASKS) {
            perr(p, "too many negated items in one class");
            return UINT32_MAX;
        }
        c->neg_masks[c->n_neg_masks++] = ENG_UCAT_BIT(ENG_UCAT_ND);
        return UINT32_MAX;
    case 'p':
    case 'P': {
        const char *name;
        size_t len;
        if (p->pat[p->pos] == '{') {
            name = p->pat + p->pos + 1;
            const char *close = strchr(name, '}');
            if (!close) {
                perr(p, "missing } in \\p{...}");
                return UINT32_MAX;
            }
            len = (size_t) (close - name);
            p->pos += len + 2;
        } else {
            name = p->pat + p->pos;
            len = name[0] ? 1 : 0;
            p->pos += len;
        }
        bool neg = e == 'P';
        if (len > 0 && name[0] == '^') {
            neg = !neg;
            name++;
            len--;
        }
        uint32_t mask = property_mask(name, len);
        if (!mask) {
            perr(p, "unsupported property \\p{%.*s}", (int) len, name);
            return UINT32_MAX;
        }
        if (!neg) {
            c->cat_mask |= mask;
        } else if (c->n_neg_masks < MAX_NEG_MASKS) {
            c->neg_masks[c->n_neg_masks++] = mask;
        } else {
            perr(p, "too many negated items in one class");
        }
        return UINT32_MAX;
    }
    default:
        if ((e >= 'a' && e <= 'z') || (e >= 'A' && e <= 'Z') || (e >= '0' && e <= '9')) {
            p->pos--;
            perr(p, "unsupported escape \\%c", e);
            return 0;
        }
        p->pos--;
        return read_cp(p);   /* escaped punctuation or any non-ASCII char */
    }
}

static rnode *class_node(rparser *p, int ci) {
    rnode *n = node_new(p, N_CLASS);
    if (n) n->cls = ci;
    return n;
}

/* [...] with p->pos after '['. */
static rnode *parse_bracket(rparser *p) {
    int ci = class_new(p);
    if (ci < 0) return NULL;
    if (p->pat[p->pos] == '^') {
        p->re->classes[ci].negated = true;
        p->pos++;
    }
    bool first = true;
    while (!p->failed) {
        char ch = p->pat[p->pos];
        if (!ch) {
            perr(p, "missing ]");
            break;
        }
        if (ch == ']' && !first) {
            p->pos++;
            break;
        }
        first = false;
        if (ch == '[') {
            perr(p, "nested character classes are not supported");
            break;
        }
        if (ch == '&' && p->pat[p->pos + 1] == '&') {
            perr(p, "class intersection is not supported");
            break;
        }
        uint32_t lo;
        if (ch == '\\') {
            p->pos++;
            lo = parse_escape(p, ci);
            if (lo == UINT32_MAX) continue;
        } else {
            lo = read_cp(p);
        }
        uint32_t hi = lo;
        if (p->pat[p->pos] == '-' && p->pat[p->pos + 1] && p->pat[p->pos + 1] != ']') {
            p->pos++;
            if (p->pat[p->pos] == '\\') {
                p->pos++;
                hi = parse_escape(p, ci);
                if (hi == UINT32_MAX) {
                    perr(p, "class escape used as a range end");
                    break;
                }
            } else {
                hi = read_cp(p);
            }
            if (hi < lo) {
                perr(p, "range out of order");
                break;
            }
        }
        class_add_range(p, ci, lo, hi);
    }
    return p->failed ? NULL : class_node(p, ci);
}

static rnode *parse_alt(rparser *p);

static rnode *parse_atom(rparser *p) {
    char ch = p->pat[p->pos];
    if (ch == '(') {
        p->pos++;
        bool saved_icase = p->icase;
        int type = N_CAT;
        bool neg = false;
        if (p->pat[p->pos] == '?') {
            const char *q = p->pat + p->pos + 1;
            if (q[0] == ':') {
                p->pos += 2;
            } else if (q[0] == '=' || q[0] == '!') {
                type = N_LOOK;
                neg = q[0] == '!';
                p->pos += 2;
            } else if (q[0] == 'i' && q[1] == ':') {
                p->icase = true;
                p->pos += 3;
            } else if (q[0] == '-' && q[1] == 'i' && q[2] == ':') {
                p->icase = false;
                p->pos += 4;
            } else {
                perr(p, "unsupported group syntax");
                return NULL;
            }
        }
        rnode *body = parse_alt(p);
        p->icase = saved_icase;
        if (!body) return NULL;
        if (p->pat[p->pos] != ')') {
            node_free(body);
            perr(p, "missing )");
            return NULL;
        }
        p->pos++;
        if (type == N_LOOK) {
            rnode *n = node_new(p, N_LOOK);
            if (!n) {
                node_free(body);
                return NULL;
            }
            n->neg = neg;
            node_add(p, n, body);
            return p->failed ? (node_free(n), NULL) : n;
        }
        return body;
    }
    if (ch == '[') {
        p->pos++;
        return parse_bracket(p);
    }
    if (ch == '.') {
        p->pos++;
        int ci = class_new(p);
        if (ci < 0) return NULL;
        p->re->classes[ci].flags |= CF_ANY_BUT_NL;
        return class_node(p, ci);
    }
    if (ch == '^') {
        p->pos++;
        return node_new(p, N_BOL);
    }
    if (ch == '$') {
        p->pos++;
        return node_new(p, N_EOL);
    }
    if (ch == '\\') {
        char e = p->pat[p->pos + 1];
        if (e == 'b' || e == 'B') {
            p->pos += 2;
            return node_new(p, e == 'b' ? N_WORDB : N_NWORDB);
        }
        if (e == 'A') {
            p->pos += 2;
            return node_new(p, N_BOL);
        }
        if (e == 'z' || e == 'Z') {
            p->pos += 2;
            return node_new(p, N_EOL);
        }
        p->pos++;
        int ci = class_new(p);
        if (ci < 0) return NULL;
        uint32_t cp = parse_escape(p, ci);
        if (p->failed) return NULL;
        if (cp != UINT32_MAX) class_add_range(p, ci, cp, cp);
        return class_node(p, ci);
    }
    if (ch == '*' || ch == '+' || ch == '?' || ch == '{') {
        perr(p, "quantifier without an operand");
        return NULL;
    }
    int ci = class_new(p);
    if (ci < 0) return NULL;
    uint32_t cp = read_cp(p);
    class_add_range(p, ci, cp, cp);
    return p->failed ? NULL : class_node(p, ci);
}

static bool parse_int(rparser *p, int *out) {
    int v = 0, n = 0;
    while (p->pat[p->pos] >= '0' && p->pat[p->pos] <= '9' && n < 6) {
        v = v * 10 + (p->pat[p->pos] - '0');
        p->pos++;
        n++;
    }
    *out = v;
    return n > 0;
}

static rnode *parse_repeat(rparser *p) {
    rnode *atom = parse_atom(p);
    while (atom && !p->failed) {
        char ch = p->pat[p->pos];
        int min, max;
        if (ch == '*') {
            min = 0;
            max = -1;
            p->pos++;
        } else if (ch == '+') {
            min = 1;
            max = -1;
            p->pos++;
        } else if (ch == '?') {
            min = 0;
            max = 1;
            p->pos++;
        } else if (ch == '{' && p->pat[p->pos + 1] >= '0' && p->pat[p->pos + 1] <= '9') {
            p->pos++;
            parse_int(p, &min);
            max = min;
            if (p->pat[p->pos] == ',') {
                p->pos++;
                if (!parse_int(p, &max)) max = -1;
            }
            if (p->pat[p->pos] != '}') {
                perr(p, "bad {n,m} quantifier");
                break;
            }
            p->pos++;
            if (min > MAX_REPEAT || max > MAX_REPEAT || (max >= 0 && max < min)) {
                perr(p, "bad repeat count");
                break;
            }
        } else {
            break;
        }
        rnode *rep = node_new(p, N_REP);
        if (!rep) break;
        rep->min = min;
        rep->max = max;
        rep->greedy = true;
        /* lazy x?? is honoured; possessive x?+ is run as greedy, as llama.cpp does */
        if (p->pat[p->pos] == '?') {
            rep->greedy = false;
            p->pos++;
        } else if (p->pat[p->pos] == '+') {
            p->pos++;
        }
        node_add(p, rep, atom);
        atom = rep;
    }
    if (p->failed) {
        node_free(atom);
        return NULL;
    }
    return atom;
}

static rnode *parse_concat(rparser *p) {
    rnode *cat = node_new(p, N_CAT);
    while (cat && !p->failed) {
        char ch = p->pat[p->pos];
        if (!ch || ch == '|' || ch == ')') break;
        if (!node_add(p, cat, parse_repeat(p))) break;
    }
    if (p->failed) {
        node_free(cat);
        return NULL;
    }
    return cat;
}

static rnode *parse_alt(rparser *p) {
    rnode *first = parse_concat(p);
    if (!first || p->pat[p->pos] != '|') return first;
    rnode *alt = node_new(p, N_ALT);
    if (!alt) {
        node_free(first);
        return NULL;
    }
    node_add(p, alt, first);
    while (!p->failed && p->pat[p->pos] == '|') {
        p->pos++;
        if (!node_add(p, alt, parse_concat(p))) break;
    }
    if (p->failed) {
        node_free(alt);
        return NULL;
    }
    return alt;
}

/* ---- regex: code generation --------------------------------------------- */

static uint32_t emit(rparser *p, uint8_t op, uint32_t x, uint32_t y) {
    eng_uregex *re = p->re;
    if (re->n_prog >= MAX_PROG) {
        perr(p, "pattern too large");
        return 0;
    }
    if (re->n_prog == re->cap_prog) {
        uint32_t cap = re->cap_prog ? re->cap_prog * 2 : 64;
        rinst *pr = realloc(re->prog, cap * sizeof(*pr));
        if (!pr) {
            perr(p, "out of memory");
            return 0;
        }
        re->prog = pr;
        re->cap_prog = cap;
    }
    rinst *in = &re->prog[re->n_prog];
    in->op = op;
    in->neg = 0;
    in->x = x;
    in->y = y;
    return re->n_prog++;
}

/* Does the node always match a bounded number of characters? */
static bool node_bounded(const rnode *n) {
    if (n->type == N_REP && n->max < 0) return false;
    for (int i = 0; i < n->n_kids; i++) {
        if (!node_bounded(n->kids[i])) return false;
    }
    return true;
}

static void gen(rparser *p, const rnode *n) {
    if (p->failed) return;
    eng_uregex *re = p->re;
    switch (n->type) {
    case N_EMPTY:
        break;
    case N_CLASS:
        emit(p, OP_CLASS, (uint32_t) n->cls, 0);
        break;
    case N_CAT:
        for (int i = 0; i < n->n_kids; i++) gen(p, n->kids[i]);
        break;
    case N_ALT: {
        /* SPLIT a, next; a; JMP end; next: SPLIT b, next2; ... last */
        uint32_t jumps[256];
        int n_jumps = 0;
        if (n->n_kids > 256) {
            perr(p, "too many alternatives");
            return;
        }
        for (int i = 0; i < n->n_kids; i++) {
            if (i + 1 < n->n_kids) {
                uint32_t split = emit(p, OP_SPLIT, 0, 0);
                if (p->failed) return;
                re->prog[split].x = re->n_prog;
                gen(p, n->kids[i]);
                jumps[n_jumps++] = emit(p, OP_JMP, 0, 0);
                if (p->failed) return;
                re->prog[split].y = re->n_prog;
            } else {
                gen(p, n->kids[i]);
            }
        }
        for (int i = 0; i < n_jumps && !p->failed; i++) re->prog[jumps[i]].x = re->n_prog;
        break;
    }
    case N_REP: {
        const rnode *body = n->kids[0];
        for (int i = 0; i < n->min; i++) gen(p, body);
        if (n->max < 0) {
            uint32_t split = emit(p, OP_SPLIT, 0, 0);
            gen(p, body);
            emit(p, OP_JMP, split, 0);
            if (p->failed) return;
            uint32_t body_pc = split + 1, exit_pc = re->n_prog;
            re->prog[split].x = n->greedy ? body_pc : exit_pc;
            re->prog[split].y = n->greedy ? exit_pc : body_pc;
        } else if (n->max > n->min) {
            uint32_t splits[MAX_REPEAT];
            int k = n->max - n->min;
            for (int i = 0; i < k; i++) {
                splits[i] = emit(p, OP_SPLIT, 0, 0);
                if (p->failed) return;
                re->prog[splits[i]].x = re->n_prog;
                gen(p, body);
            }
            for (int i = 0; i < k && !p->failed; i++) {
                uint32_t body_pc = splits[i] + 1, exit_pc = re->n_prog;
                re->prog[splits[i]].x = n->greedy ? body_pc : exit_pc;
                re->prog[splits[i]].y = n->greedy ? exit_pc : body_pc;
            }
        }
        break;
    }
    case N_LOOK: {
        if (!node_bounded(n->kids[0])) {
            perr(p, "lookahead bodies must have bounded length");
            return;
        }
        uint32_t look = emit(p, OP_LOOK, 0, 0);
        gen(p, n->kids[0]);
        emit(p, OP_MATCH, 0, 0);
        if (p->failed) return;
        re->prog[look].neg = n->neg;
        re->prog[look].x = re->n_prog;
        break;
    }
    case N_BOL: emit(p, OP_BOL, 0, 0); break;
    case N_EOL: emit(p, OP_EOL, 0, 0); break;
    case N_WORDB: emit(p, OP_WORDB, 0, 0); break;
    case N_NWORDB: emit(p, OP_NWORDB, 0, 0); break;
    }
}

void eng_uregex_free(eng_uregex *re) {
    if (!re) return;
    for (int i = 0; i < re->n_classes; i++) free(re->classes[i].ranges);
    free(re->classes);
    free(re->prog);
    free(re);
}

eng_uregex *eng_uregex_compile(const char *pattern, char *err, size_t errlen) {
    eng_uregex *re = calloc(1, sizeof(*re));
    if (!re) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    rparser p = {.pat = pattern, .re = re, .err = err, .errlen = errlen};
    if (strncmp(pattern, "(?i)", 4) == 0) {
        p.icase = true;
        p.pos = 4;
    }
    rnode *root = parse_alt(&p);
    if (root && p.pat[p.pos] != '\0') perr(&p, "unbalanced )");
    if (root) {
        gen(&p, root);
        emit(&p, OP_MATCH, 0, 0);
    }
    node_free(root);
    if (p.failed || !root) {
        if (!p.failed) perr(&p, "parse error");
        eng_uregex_free(re);
        return NULL;
    }
    for (int i = 0; i < re->n_classes; i++) class_finish(&re->classes[i]);
    return re;
}

/* ---- regex: execution ---------------------------------------------------- */

/* Failed (instruction, position) states are remembered for a window of
 * positions [base, base + window): one row of `stride` words per position.
 * The window follows the search start, so memory stays small on long spans;
 * states beyond it are simply not remembered. */
#define MEMO_WINDOW 4096

typedef struct {
    const eng_uregex *re;
    const uint32_t *cps;
    uint32_t s0, end;          /* the span being searched */
    uint64_t *visited;         /* (window, stride) bit rows */
    uint32_t base, window;
    size_t stride;
    uint32_t (*stack)[2];      /* (pc, pos) frames to resume */
    size_t n_stack, cap_stack;
} rexec;

static bool at_word_boundary(const rexec *x, uint32_t pos) {
    bool before = pos > x->s0 && is_word_cp(x->cps[pos - 1]);
    bool after = pos < x->end && is_word_cp(x->cps[pos]);
    return before != after;
}

/* Runs the bounded lookahead body starting at pc; true if it matches at pos. */
static bool run_look(const rexec *x, uint32_t pc, uint32_t pos) {
    const rinst *prog = x->re->prog;
    for (;;) {
        const rinst *in = &prog[pc];
        switch (in->op) {
        case OP_CLASS:
            if (pos >= x->end || !class_match(&x->re->classes[in->x], x->cps[pos])) return false;
            pc++;
            pos++;
            break;
        case OP_SPLIT:
            if (run_look(x, in->x, pos)) return true;
            pc = in->y;
            break;
        case OP_JMP:
            pc = in->x;
            break;
        case OP_LOOK:
            if (run_look(x, pc + 1, pos) == (bool) in->neg) return false;
            pc = in->x;
            break;
        case OP_BOL:
            if (pos != x->s0) return false;
            pc++;
            break;
        case OP_EOL:
            if (pos != x->end) return false;
            pc++;
            break;
        case OP_WORDB:
        case OP_NWORDB:
            if (at_word_boundary(x, pos) != (in->op == OP_WORDB)) return false;
            pc++;
            break;
        case OP_MATCH:
            return true;
        }
    }
}

/* Leftmost-first match starting exactly at `start`. Returns 1 and the match
 * end in *mend, 0 for no match, -1 when out of memory. */
static int match_at(rexec *x, uint32_t start, uint32_t *mend) {
    const rinst *prog = x->re->prog;
    x->n_stack = 0;
    uint32_t pc = 0, pos = start;
    for (;;) {
        uint32_t row = pos - x->base;
        if (row < x->window) {
            uint64_t *w = &x->visited[row * x->stride + (pc >> 6)];
            if (*w & (1ull << (pc & 63))) goto fail;
            *w |= 1ull << (pc & 63);
        }
        const rinst *in = &prog[pc];
        switch (in->op) {
        case OP_CLASS:
            if (pos >= x->end || !class_match(&x->re->classes[in->x], x->cps[pos])) goto fail;
            pc++;
            pos++;
            continue;
        case OP_SPLIT:
            if (x->n_stack == x->cap_stack) {
                size_t cap = x->cap_stack ? x->cap_stack * 2 : 256;
                void *s = realloc(x->stack, cap * sizeof(*x->stack));
                if (!s) return -1;
                x->stack = s;
                x->cap_stack = cap;
            }
            x->stack[x->n_stack][0] = in->y;
            x->stack[x->n_stack][1] = pos;
            x->n_stack++;
            pc = in->x;
            continue;
        case OP_JMP:
            pc = in->x;
            continue;
        case OP_LOOK:
            if (run_look(x, pc + 1, pos) == (bool) in->neg) goto fail;
            pc = in->x;
            continue;
        case OP_BOL:
            if (pos != x->s0) goto fail;
            pc++;
            continue;
        case OP_EOL:
            if (pos != x->end) goto fail;
            pc++;
            continue;
        case OP_WORDB:
        case OP_NWORDB:
            if (at_word_boundary(x, pos) != (in->op == OP_WORDB)) goto fail;
            pc++;
            continue;
        case OP_MATCH:
            *mend = pos;
            return 1;
        }
    fail:
        if (x->n_stack == 0) return 0;
        x->n_stack--;
        pc = x->stack[x->n_stack][0];
        pos = x->stack[x->n_stack][1];
    }
}

/* Moves the memo window to start at position s. */
static void memo_shift(rexec *x, uint32_t s) {
    uint32_t drop = s - x->base;
    size_t row_bytes = x->stride * sizeof(uint64_t);
    if (drop < x->window) {
        memmove(x->visited, x->visited + (size_t) drop * x->stride, (x->window - drop) * row_bytes);
        memset(x->visited + (size_t) (x->window - drop) * x->stride, 0, drop * row_bytes);
    } else {
        memset(x->visited, 0, x->window * row_bytes);
    }
    x->base = s;
}

int eng_uregex_split(const eng_uregex *re, const uint32_t *cps, const eng_spans *in,
                     eng_spans *out, bool drop_matches) {
    rexec x = {.re = re, .cps = cps, .stride = (re->n_prog + 63) / 64};
    size_t max_len = 0;
    for (size_t i = 0; i < in->n; i++) {
        size_t len = in->v[i].end - in->v[i].start;
        if (len > max_len) max_len = len;
    }
    x.window = max_len + 1 < MEMO_WINDOW ? (uint32_t) max_len + 1 : MEMO_WINDOW;
    x.visited = malloc((size_t) x.window * x.stride * sizeof(uint64_t));
    if (!x.visited) return -1;
    int rc = 0;
    for (size_t i = 0; i < in->n && rc == 0; i++) {
        x.s0 = x.base = in->v[i].start;
        x.end = in->v[i].end;
        if (x.end == x.s0) continue;
        uint32_t rows = x.end - x.s0 + 1 < x.window ? x.end - x.s0 + 1 : x.window;
        memset(x.visited, 0, (size_t) rows * x.stride * sizeof(uint64_t));
        uint32_t gap = x.s0;
        for (uint32_t s = x.s0; s < x.end && rc == 0; s++) {
            if (s - x.base >= x.window / 2 && x.end - x.base + 1 > x.window) memo_shift(&x, s);
            uint32_t mend;
            int m = match_at(&x, s, &mend);
            if (m < 0) {
                rc = -1;
                break;
            }
            if (m == 0 || mend == s) continue;
            if (gap < s) rc |= eng_spans_push(out, gap, s);
            if (!drop_matches) rc |= eng_spans_push(out, s, mend);
            gap = mend;
            /* states at the match end were on the success path, not failed:
             * forget them before the next search starts there */
            if (mend - x.base < x.window) {
                memset(x.visited + (size_t) (mend - x.base) * x.stride, 0, x.stride * sizeof(uint64_t));
            }
            s = mend - 1;
        }
        if (rc == 0 && gap < x.end) rc |= eng_spans_push(out, gap, x.end);
    }
    free(x.visited);
    free(x.stack);
    return rc ? -1 : 0;
}

/* chat.c: chat messages -> prompt text in the model's template format.
 *
 * Each format is rendered natively, reproducing what its real Jinja template
 * renders (checked byte for byte against Jinja2 in tests/engine/test_chat.c),
 * including the details that bite: Llama 3 / Gemma trim content the way
 * Python's str.strip() does (Unicode whitespace included), Llama 2 strips the
 * whole turn after the <<SYS>> block is prepended, Mistral v3 joins the system
 * message to the last user turn, ChatML templates may insert a default system
 * message. Where the template would raise (roles out of order) we fail too. */
#include "engine/chat.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- growable output buffer -------------------------------------------- */

typedef struct {
    char *buf;
    size_t len, cap;
    bool oom;
} strbuf;

static void sb_add(strbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *grown = realloc(b->buf, cap);
        if (!grown) {
            b->oom = true;
            return;
        }
        b->buf = grown;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, s, n);
    b->len += n;
    b->buf[b->len] = '\0';
}

static void sb_puts(strbuf *b, const char *s)
{
    sb_add(b, s, strlen(s));
}

/* ---- Python's str.strip() on UTF-8 ------------------------------------- */

/* Length of the whitespace character at s (per Python's str.isspace), or 0.
 * n is the bytes available. */
static size_t space_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if ((c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20))
        return 1;
    if (c == 0xc2 && n >= 2 && (s[1] == 0x85 || s[1] == 0xa0))
        return 2; /* U+0085, U+00A0 */
    if (n < 3)
        return 0;
    if (c == 0xe1 && s[1] == 0x9a && s[2] == 0x80)
        return 3; /* U+1680 */
    if (c == 0xe2 && s[1] == 0x80 &&
        (s[2] <= 0x8a || s[2] == 0xa8 || s[2] == 0xa9 || s[2] == 0xaf) && s[2] >= 0x80)
        return 3; /* U+2000..200A, U+2028, U+2029, U+202F */
    if (c == 0xe2 && s[1] == 0x81 && s[2] == 0x9f)
        return 3; /* U+205F */
    if (c == 0xe3 && s[1] == 0x80 && s[2] == 0x80)
        return 3; /* U+3000 */
    return 0;
}

/* Bytes in the UTF-8 character led by c (1 for a stray byte). */
static size_t char_len(unsigned char c)
{
    if (c >= 0xf0 && c <= 0xf4)
        return 4;
    if (c >= 0xe0)
        return c <= 0xef ? 3 : 1;
    if (c >= 0xc2)
        return 2;
    return 1;
}

/* Appends s[0, n) without its leading and trailing whitespace. */
static void sb_add_stripped(strbuf *b, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t start = 0, sp;
    while (start < n && (sp = space_len(u + start, n - start)) > 0)
        start += sp;
    size_t end = start;
    for (size_t i = start; i < n;) {
        size_t sl = space_len(u + i, n - i);
        if (sl) {
            i += sl;
            continue;
        }
        size_t cl = char_len(u[i]);
        i += cl <= n - i ? cl : n - i;
        end = i;
    }
    sb_add(b, s + start, end - start);
}

/* ---- messages ----------------------------------------------------------- */

typedef enum { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL } chat_role;

static const char *const role_names[] = {"system", "user", "assistant", "tool"};

static const char *const format_names[ENG_CHAT_FORMAT_COUNT] = {
    [ENG_CHAT_PLAIN] = "plain",
    [ENG_CHAT_CHATML] = "chatml",
    [ENG_CHAT_LLAMA3] = "llama3",
    [ENG_CHAT_LLAMA2] = "llama2",
    [ENG_CHAT_MISTRAL] = "mistral",
    [ENG_CHAT_MISTRAL_V1] = "mistral-v1",
    [ENG_CHAT_MISTRAL_V3] = "mistral-v3",
    [ENG_CHAT_MISTRAL_V3_TEKKEN] = "mistral-v3-tekken",
    [ENG_CHAT_MISTRAL_V7] = "mistral-v7",
    [ENG_CHAT_PHI3] = "phi3",
    [ENG_CHAT_GEMMA] = "gemma",
};

const char *eng_chat_format_name(eng_chat_format f)
{
    return (unsigned)f < ENG_CHAT_FORMAT_COUNT ? format_names[f] : "unknown";
}

int eng_chat_format_from_name(const char *name)
{
    for (int f = 0; name && f < ENG_CHAT_FORMAT_COUNT; f++)
        if (strcmp(name, format_names[f]) == 0)
            return f;
    return -1;
}

/* A message validated: its role and its content (never NULL). */
typedef struct {
    chat_role role;
    const char *content;
} chat_turn;

/* State of one rendering: the output and where errors go. */
typedef struct {
    strbuf out;
    const chat_turn *turns;
    int n;
    char *err;
    size_t errlen;
    eng_chat_format format;
} render;

static int fail(render *r, const char *fmt, ...)
{
    if (r->err && r->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->err, r->errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static int fail_role(render *r, int i, const char *why)
{
    return fail(r, "message %d: role '%s' %s in the %s chat format", i,
                role_names[r->turns[i].role], why, eng_chat_format_name(r->format));
}

/* The turns [first, n) must go user, assistant, user, ... as the [INST] and
 * Gemma templates demand (they raise otherwise). */
static int check_alternation(render *r, int first)
{
    for (int i = first; i < r->n; i++) {
        chat_role want = (i - first) % 2 == 0 ? ROLE_USER : ROLE_ASSISTANT;
        if (r->turns[i].role == ROLE_SYSTEM && i > 0)
            return fail_role(r, i, "is only allowed as the first message");
        if (r->turns[i].role == ROLE_TOOL)
            return fail_role(r, i, "has no place");
        if (r->turns[i].role != want)
            return fail(r,
                        "message %d: expected role '%s': the %s chat format needs user and "
                        "assistant turns to alternate, starting with user%s",
                        i, role_names[want], eng_chat_format_name(r->format),
                        first ? " after the system message" : "");
    }
    return 0;
}

/* ---- ChatML ------------------------------------------------------------- */

/* Appends the Jinja string-literal escape \c as its character. */
static void add_unescaped(strbuf *b, char c)
{
    switch (c) {
    case 'n': sb_add(b, "\n", 1); break;
    case 't': sb_add(b, "\t", 1); break;
    case 'r': sb_add(b, "\r", 1); break;
    default: sb_add(b, &c, 1); break; /* \\ \' \" */
    }
}

/* Is src[at] inside a {{ }}, {% %} or {# #} tag? */
static bool inside_tag(const char *src, const char *at)
{
    const char *open = NULL, *close = NULL;
    for (const char *p = src; p + 1 < at; p++) {
        if (p[0] == '{' && (p[1] == '{' || p[1] == '%' || p[1] == '#'))
            open = p;
        else if ((p[0] == '}' || p[0] == '%' || p[0] == '#') && p[1] == '}')
            close = p;
    }
    return open && (!close || close < open);
}

/* The default system message of a ChatML template (SmolLM2, Qwen): literal
 * text "<|im_start|>system\n<text><|im_end|>", in a quoted string or in the
 * template's raw text, whose <text> holds no template syntax. Returns it
 * malloc'd, or NULL when the template has none (or memory runs out). */
static char *chatml_default_system(const char *src)
{
    static const char marker[] = "<|im_start|>system";
    for (const char *p = strstr(src, marker); p; p = strstr(p + 1, marker)) {
        char quote = p > src && (p[-1] == '\'' || p[-1] == '"') ? p[-1] : 0;
        if (!quote && inside_tag(src, p))
            continue;
        const char *q = p + sizeof marker - 1;
        if (*q == '\n')
            q++;
        else if (quote && q[0] == '\\' && q[1] == 'n')
            q += 2;
        else
            continue;
        strbuf text = {0};
        bool found = false;
        while (*q) {
            if (strncmp(q, "<|im_end|>", 10) == 0) {
                found = true;
                break;
            }
            if (quote && *q == quote)
                break;
            if (!quote && q[0] == '{' && (q[1] == '{' || q[1] == '%' || q[1] == '#'))
                break;
            if (quote && q[0] == '\\' && q[1]) {
                add_unescaped(&text, q[1]);
                q += 2;
                continue;
            }
            sb_add(&text, q, 1);
            q++;
        }
        if (found && text.len > 0 && !text.oom)
            return text.buf;
        free(text.buf);
    }
    return NULL;
}

static void chatml_turn(strbuf *b, const char *role, const char *content)
{
    sb_puts(b, "<|im_start|>");
    sb_puts(b, role);
    sb_puts(b, "\n");
    sb_puts(b, content);
    sb_puts(b, "<|im_end|>\n");
}

static int render_chatml(render *r, const char *src, bool gen)
{
    char *default_system = src ? chatml_default_system(src) : NULL;
    /* Qwen2.5 sends tool results as <tool_response> blocks inside one user
     * turn per run of consecutive tool messages. */
    bool tool_response = src && strstr(src, "<tool_response>");
    if (default_system && r->turns[0].role != ROLE_SYSTEM)
        chatml_turn(&r->out, "system", default_system);
    free(default_system);
    for (int i = 0; i < r->n; i++) {
        const chat_turn *t = &r->turns[i];
        if (t->role == ROLE_TOOL && tool_response) {
            if (i == 0 || r->turns[i - 1].role != ROLE_TOOL)
                sb_puts(&r->out, "<|im_start|>user");
            sb_puts(&r->out, "\n<tool_response>\n");
            sb_puts(&r->out, t->content);
            sb_puts(&r->out, "\n</tool_response>");
            if (i == r->n - 1 || r->turns[i + 1].role != ROLE_TOOL)
                sb_puts(&r->out, "<|im_end|>\n");
        } else {
            chatml_turn(&r->out, role_names[t->role], t->content);
        }
    }
    if (gen)
        sb_puts(&r->out, "<|im_start|>assistant\n");
    return 0;
}

/* ---- Llama 3 ------------------------------------------------------------ */

static void llama3_header(strbuf *b, const char *role)
{
    sb_puts(b, "<|start_header_id|>");
    sb_puts(b, role);
    sb_puts(b, "<|end_header_id|>\n\n");
}

static int render_llama3(render *r, bool gen)
{
    sb_puts(&r->out, "<|begin_of_text|>");
    for (int i = 0; i < r->n; i++) {
        llama3_header(&r->out, role_names[r->turns[i].role]);
        sb_add_stripped(&r->out, r->turns[i].content, strlen(r->turns[i].content));
        sb_puts(&r->out, "<|eot_id|>");
    }
    if (gen)
        llama3_header(&r->out, "assistant");
    return 0;
}

/* ---- Llama 2 ------------------------------------------------------------ */

static int render_llama2(render *r)
{
    int first = r->turns[0].role == ROLE_SYSTEM ? 1 : 0;
    if (check_alternation(r, first))
        return -1;
    strbuf content = {0};
    for (int i = first; i < r->n; i++) {
        const chat_turn *t = &r->turns[i];
        content.len = 0;
        if (i == 1 && first) {
            sb_puts(&content, "<<SYS>>\n");
            sb_puts(&content, r->turns[0].content);
            sb_puts(&content, "\n<</SYS>>\n\n");
        }
        sb_puts(&content, t->content);
        if (content.oom)
            break;
        if (t->role == ROLE_USER) {
            sb_puts(&r->out, "<s>[INST] ");
            sb_add_stripped(&r->out, content.buf, content.len);
            sb_puts(&r->out, " [/INST]");
        } else {
            sb_puts(&r->out, " ");
            sb_add_stripped(&r->out, content.buf, content.len);
            sb_puts(&r->out, " </s>");
        }
    }
    r->out.oom |= content.oom;
    free(content.buf);
    return 0;
}

/* ---- Mistral [INST] variants -------------------------------------------- */

typedef enum {
    SYSTEM_REJECTED,     /* the template has no system role */
    SYSTEM_FIRST_USER,   /* "system\n\nuser" in the first user turn */
    SYSTEM_LAST_USER,    /* the same in the last turn, if it is a user turn */
    SYSTEM_OWN_BLOCK,    /* [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT] in place */
} system_placement;

typedef struct {
    const char *inst_open, *inst_close;   /* around a user turn */
    const char *answer_prefix;            /* before an assistant turn */
    bool trim_answer;
    system_placement system;
} mistral_style;

static const mistral_style *mistral_style_of(eng_chat_format f)
{
    static const mistral_style legacy = {"[INST] ", " [/INST]", "", false, SYSTEM_REJECTED};
    static const mistral_style v1 = {" [INST] ", " [/INST]", " ", false, SYSTEM_FIRST_USER};
    static const mistral_style v3 = {"[INST] ", "[/INST]", " ", true, SYSTEM_LAST_USER};
    static const mistral_style tekken = {"[INST]", "[/INST]", "", false, SYSTEM_LAST_USER};
    static const mistral_style v7 = {"[INST] ", "[/INST]", " ", false, SYSTEM_OWN_BLOCK};
    switch (f) {
    case ENG_CHAT_MISTRAL_V1: return &v1;
    case ENG_CHAT_MISTRAL_V3: return &v3;
    case ENG_CHAT_MISTRAL_V3_TEKKEN: return &tekken;
    case ENG_CHAT_MISTRAL_V7: return &v7;
    default: return &legacy;
    }
}

static int render_mistral(render *r)
{
    const mistral_style *st = mistral_style_of(r->format);
    const chat_turn *t = r->turns;
    int first = 0;
    const char *system = NULL;
    if (st->system == SYSTEM_OWN_BLOCK) {
        /* v7 checks no order: any sequence of system, user, assistant. */
        for (int i = 0; i < r->n; i++)
            if (t[i].role == ROLE_TOOL)
                return fail_role(r, i, "has no place");
    } else {
        if (t[0].role == ROLE_SYSTEM && st->system != SYSTEM_REJECTED) {
            system = t[0].content;
            first = 1;
        }
        if (check_alternation(r, first))
            return -1;
    }
    sb_puts(&r->out, "<s>");
    for (int i = first; i < r->n; i++) {
        if (t[i].role == ROLE_SYSTEM) {
            sb_puts(&r->out, "[SYSTEM_PROMPT] ");
            sb_puts(&r->out, t[i].content);
            sb_puts(&r->out, "[/SYSTEM_PROMPT]");
        } else if (t[i].role == ROLE_USER) {
            bool with_system =
                system && ((st->system == SYSTEM_FIRST_USER && i == first) ||
                           (st->system == SYSTEM_LAST_USER && i == r->n - 1));
            sb_puts(&r->out, st->inst_open);
            if (with_system) {
                sb_puts(&r->out, system);
                sb_puts(&r->out, "\n\n");
            }
            sb_puts(&r->out, t[i].content);
            sb_puts(&r->out, st->inst_close);
        } else {
            sb_puts(&r->out, st->answer_prefix);
            if (st->trim_answer)
                sb_add_stripped(&r->out, t[i].content, strlen(t[i].content));
            else
                sb_puts(&r->out, t[i].content);
            sb_puts(&r->out, "</s>");
        }
    }
    return 0;
}

/* ---- Phi-3 -------------------------------------------------------------- */

static int render_phi3(render *r, const char *src, bool gen)
{
    /* Phi-3.5 / 3-mini (2024-07) skip an empty system message. */
    bool skip_empty_system = !src || strstr(src, "'system' and message['content']");
    for (int i = 0; i < r->n; i++) {
        const chat_turn *t = &r->turns[i];
        if (t->role == ROLE_TOOL)
            return fail_role(r, i, "has no place");
        if (t->role == ROLE_SYSTEM && skip_empty_system && !t->content[0])
            continue;
        sb_puts(&r->out, "<|");
        sb_puts(&r->out, role_names[t->role]);
        sb_puts(&r->out, "|>\n");
        sb_puts(&r->out, t->content);
        sb_puts(&r->out, "<|end|>\n");
    }
    sb_puts(&r->out, gen ? "<|assistant|>\n" : "<|endoftext|>");
    return 0;
}

/* ---- Gemma -------------------------------------------------------------- */

static int render_gemma(render *r, const char *src, bool gen)
{
    /* Gemma 3 puts the system message at the head of the first user turn;
     * Gemma 1 and 2 have no system role. */
    bool system_prefix = !src || strstr(src, "first_user_prefix");
    int first = 0;
    if (r->turns[0].role == ROLE_SYSTEM) {
        if (!system_prefix)
            return fail_role(r, 0, "is not supported (the template raises 'System role "
                                   "not supported')");
        first = 1;
    }
    if (check_alternation(r, first))
        return -1;
    sb_puts(&r->out, "<bos>");
    for (int i = first; i < r->n; i++) {
        const chat_turn *t = &r->turns[i];
        sb_puts(&r->out, t->role == ROLE_USER ? "<start_of_turn>user\n" : "<start_of_turn>model\n");
        if (i == 1 && first) {
            sb_puts(&r->out, r->turns[0].content);
            sb_puts(&r->out, "\n\n");
        }
        sb_add_stripped(&r->out, t->content, strlen(t->content));
        sb_puts(&r->out, "<end_of_turn>\n");
    }
    if (gen)
        sb_puts(&r->out, "<start_of_turn>model\n");
    return 0;
}

/* ---- plain -------------------------------------------------------------- */

static int render_plain(render *r, bool gen)
{
    for (int i = 0; i < r->n; i++) {
        sb_puts(&r->out, role_names[r->turns[i].role]);
        sb_puts(&r->out, ": ");
        sb_puts(&r->out, r->turns[i].content);
        sb_puts(&r->out, "\n");
    }
    if (gen)
        sb_puts(&r->out, "assistant:");
    return 0;
}

/* ---- public ------------------------------------------------------------- */

eng_chat_format eng_chat_detect(const char *src)
{
    if (!src)
        return ENG_CHAT_PLAIN;
    if (strstr(src, "<|im_start|>"))
        return ENG_CHAT_CHATML;
    if (strstr(src, "<|start_header_id|>") && strstr(src, "<|end_header_id|>"))
        return ENG_CHAT_LLAMA3;
    if (strstr(src, "<start_of_turn>"))
        return ENG_CHAT_GEMMA;
    if (strstr(src, "<|user|>") && strstr(src, "<|end|>"))
        return ENG_CHAT_PHI3;
    if (strstr(src, "[INST]")) {
        if (strstr(src, "<<SYS>>"))
            return ENG_CHAT_LLAMA2;
        if (strstr(src, "[SYSTEM_PROMPT]"))
            return ENG_CHAT_MISTRAL_V7;
        if (strstr(src, "' [INST] '"))
            return ENG_CHAT_MISTRAL_V1;
        if (strstr(src, "\"[INST]\" +"))
            return ENG_CHAT_MISTRAL_V3_TEKKEN;
        if (strstr(src, "\"[INST] \" +"))
            return ENG_CHAT_MISTRAL_V3;
        return ENG_CHAT_MISTRAL;
    }
    return ENG_CHAT_PLAIN;
}

int eng_chat_apply(eng_chat_format f, const char *template_src, const eng_chat_msg *msgs, int n,
                   bool add_generation_prompt, char **out, char *err, size_t errlen)
{
    render r = {.err = err, .errlen = errlen, .format = f};
    *out = NULL;
    if ((unsigned)f >= ENG_CHAT_FORMAT_COUNT)
        return fail(&r, "unknown chat format %d", (int)f);
    if (n < 1 || !msgs)
        return fail(&r, "no messages: a chat needs at least one");
    chat_turn *turns = malloc((size_t)n * sizeof *turns);
    if (!turns)
        return fail(&r, "out of memory for %d messages", n);
    for (int i = 0; i < n; i++) {
        int role = -1;
        for (int k = 0; msgs[i].role && k < 4; k++)
            if (strcmp(msgs[i].role, role_names[k]) == 0)
                role = k;
        if (role < 0) {
            fail(&r, "message %d: %s%s%s is not one of system, user, assistant, tool", i,
                 msgs[i].role ? "role '" : "no role", msgs[i].role ? msgs[i].role : "",
                 msgs[i].role ? "'" : "");
            free(turns);
            return -1;
        }
        turns[i] = (chat_turn){(chat_role)role, msgs[i].content ? msgs[i].content : ""};
    }
    r.turns = turns;
    r.n = n;
    int rc;
    switch (f) {
    case ENG_CHAT_CHATML: rc = render_chatml(&r, template_src, add_generation_prompt); break;
    case ENG_CHAT_LLAMA3: rc = render_llama3(&r, add_generation_prompt); break;
    case ENG_CHAT_LLAMA2: rc = render_llama2(&r); break;
    case ENG_CHAT_MISTRAL:
    case ENG_CHAT_MISTRAL_V1:
    case ENG_CHAT_MISTRAL_V3:
    case ENG_CHAT_MISTRAL_V3_TEKKEN:
    case ENG_CHAT_MISTRAL_V7: rc = render_mistral(&r); break;
    case ENG_CHAT_PHI3: rc = render_phi3(&r, template_src, add_generation_prompt); break;
    case ENG_CHAT_GEMMA: rc = render_gemma(&r, template_src, add_generation_prompt); break;
    default: rc = render_plain(&r, add_generation_prompt); break;
    }
    free(turns);
    /* An empty render (a lone system message that the format drops) is "". */
    if (rc == 0 && !r.out.buf)
        sb_add(&r.out, "", 0);
    if (rc == 0 && r.out.oom)
        rc = fail(&r, "out of memory rendering the chat");
    if (rc != 0) {
        free(r.out.buf);
        return -1;
    }
    *out = r.out.buf;
    return 0;
}

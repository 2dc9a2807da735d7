/* tokenizer.h: text <-> token ids for the models kvserve loads.
 *
 * Two model families:
 *   - byte-level BPE (GPT-2 style): text is split by the model's pre-tokenizer
 *     (named by tokenizer.ggml.pre, or read from tokenizer.json), bytes are mapped
 *     to printable unicode, and merges are applied by rank;
 *   - SentencePiece-style BPE (llama-spm, phi-3): spaces become U+2581, pieces
 *     merge by score, unknown bytes fall back to <0xXX> tokens.
 * Special and control tokens (<|im_start|>, <s>, ...) are recognized in text only
 * when the caller asks (parse_special), as chat templates do. */
#ifndef ENG_TOKENIZER_H
#define ENG_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct eng_gguf;

typedef struct eng_tokenizer eng_tokenizer;

/* From a GGUF file's tokenizer.ggml.* metadata. NULL with a message on error. */
eng_tokenizer *eng_tokenizer_from_gguf(const struct eng_gguf *g, char *err, size_t errlen);
/* From a Hugging Face directory: tokenizer.json (with tokenizer_config.json for
 * BOS/EOS and the chat template when present), or GPT-2's vocab.json +
 * merges.txt. */
eng_tokenizer *eng_tokenizer_from_hf_dir(const char *dir, char *err, size_t errlen);
void eng_tokenizer_free(eng_tokenizer *t);

int eng_tokenizer_n_vocab(const eng_tokenizer *t);
int32_t eng_tokenizer_bos(const eng_tokenizer *t);   /* -1 if none */
int32_t eng_tokenizer_eos(const eng_tokenizer *t);   /* -1 if none */
bool eng_tokenizer_add_bos(const eng_tokenizer *t);  /* does the model want BOS prepended? */
/* Is id an end-of-generation token (EOS, <|im_end|>, <|eot_id|>, <|endoftext|>...)? */
bool eng_tokenizer_is_eog(const eng_tokenizer *t, int32_t id);
/* Id of a token's exact text (e.g. "<|im_end|>"), or -1. */
int32_t eng_tokenizer_find(const eng_tokenizer *t, const char *text);
/* The model's chat template when the tokenizer files carry one (HF); NULL else. */
const char *eng_tokenizer_chat_template(const eng_tokenizer *t);

/* Encodes text[0, len). add_bos: prepend BOS if the model has one.
 * parse_special: recognize special-token text. Writes at most cap ids to out;
 * returns the total number of ids (which may exceed cap: call again with more
 * room), or -1 on invalid input (message in err). */
int eng_tokenize(const eng_tokenizer *t, const char *text, size_t len, bool add_bos,
                 bool parse_special, int32_t *out, int cap, char *err, size_t errlen);

/* The raw bytes of a token (after byte-level / SPM decoding: a piece may hold
 * part of a UTF-8 character). Special tokens decode to their text only when
 * `special` is true, otherwise to nothing. Returns the byte count written to buf
 * (at most cap) or the needed size if larger. */
int eng_token_to_bytes(const eng_tokenizer *t, int32_t id, bool special, char *buf, int cap);

/* Incremental detokenizer: feed ids one at a time, get back only complete
 * UTF-8 text; bytes of an unfinished character wait for the next token.
 * An invalid sequence is emitted as U+FFFD. Caller-owned; zero-init or _init. */
typedef struct {
    char pending[8];
    int n_pending;
    bool first;           /* SPM: strip the leading space of the first piece */
} eng_detok;
void eng_detok_init(eng_detok *d);
/* Appends the text completed by `id` to out (cap bytes), returns bytes written
 * (the output is never more than 4 * 64 bytes per token). */
int eng_detok_push(eng_detok *d, const eng_tokenizer *t, int32_t id, char *out, int cap);
/* Flushes pending bytes at the end of a stream (as U+FFFD if incomplete). */
int eng_detok_flush(eng_detok *d, char *out, int cap);

#endif

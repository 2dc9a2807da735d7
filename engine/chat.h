/* chat.h: chat messages -> prompt text, in the format of the model's template.
 *
 * kvserve does not run Jinja. It recognizes which well-known format a model's
 * template source (tokenizer.chat_template / tokenizer_config.json) writes and
 * renders that format natively, byte for byte as the real template renders it
 * with add_generation_prompt (checked against Jinja2 in the tests):
 *
 *   chatml       <|im_start|>role\ncontent<|im_end|>\n ... <|im_start|>assistant\n
 *                (SmolLM2, Qwen, OpenHermes); a default system message that the
 *                template inserts when the first message is not a system one
 *                (SmolLM2, Qwen) is extracted from the template and inserted
 *                too; tool turns go under their role, or as Qwen2.5's
 *                <tool_response> blocks when the template has them
 *   llama3       <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\n
 *                content (trimmed)<|eot_id|> ...
 *   llama2       <s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] answer </s>
 *   mistral      <s>[INST] user [/INST]answer</s> (Mistral 7B v0.1/v0.2 legacy:
 *                no system role)
 *   mistral-v1   <s> [INST] system\n\nuser [/INST] answer</s>
 *   mistral-v3   <s>[INST] user[/INST] answer</s>, the system message joined to
 *                the last user message (7B v0.3, Large 2407)
 *   mistral-v3-tekken  as mistral-v3 without the space after [INST] and
 *                before the answer, which is not trimmed (Nemo)
 *   mistral-v7   <s>[SYSTEM_PROMPT] system[/SYSTEM_PROMPT][INST] user[/INST]
 *                answer</s>, turns in any order (Large 2411)
 *   phi3         <|system|>\n..<|end|>\n<|user|>\n..<|end|>\n<|assistant|>\n
 *   gemma        <bos><start_of_turn>user\n..<end_of_turn>\n<start_of_turn>model\n
 *                (assistant is "model"); a system message starts the first
 *                user turn (Gemma 3, and no template), or is an error
 *                (Gemma 1 and 2 templates)
 *   plain        "role: content\n" per message, then "assistant:" (no template,
 *                or one not recognized)
 *
 * The text holds special-token text (<|im_start|>, and the BOS text where the
 * template writes it): tokenize it with parse_special = true and add_bos =
 * false, as vLLM does for chat (add_special_tokens=False).
 *
 * Roles are "system", "user", "assistant" and "tool"; any other is an error
 * naming it. Where the real template raises (roles that do not alternate in
 * the [INST] and Gemma formats) this is an error too, with the reason; so is a
 * turn the format has no place for (a tool turn outside chatml / llama3 /
 * plain, a system turn after the first in llama2 and gemma), which the real
 * templates would raise on or silently drop. */
#ifndef ENG_CHAT_H
#define ENG_CHAT_H

#include <stdbool.h>
#include <stddef.h>

typedef enum {
    ENG_CHAT_PLAIN = 0,
    ENG_CHAT_CHATML,
    ENG_CHAT_LLAMA3,
    ENG_CHAT_LLAMA2,
    ENG_CHAT_MISTRAL,
    ENG_CHAT_MISTRAL_V1,
    ENG_CHAT_MISTRAL_V3,
    ENG_CHAT_MISTRAL_V3_TEKKEN,
    ENG_CHAT_MISTRAL_V7,
    ENG_CHAT_PHI3,
    ENG_CHAT_GEMMA,
    ENG_CHAT_FORMAT_COUNT
} eng_chat_format;

typedef struct {
    const char *role;     /* "system", "user", "assistant" or "tool" */
    const char *content;  /* UTF-8, NUL-terminated; NULL counts as "" */
} eng_chat_msg;

/* The format a template source writes; ENG_CHAT_PLAIN for NULL or an
 * unrecognized template. */
eng_chat_format eng_chat_detect(const char *template_src);

/* Renders msgs[0, n) (n >= 1) into *out (malloc'd, NUL-terminated; the caller
 * frees it). template_src may be NULL; when given, details that vary between
 * templates of one format are read from it (ChatML's default system message,
 * Phi-3's skipping of empty system messages). add_generation_prompt appends
 * the opening of an assistant turn. Returns 0, or -1 with *out = NULL and a
 * message in err (a role, a message index and what is wrong). */
int eng_chat_apply(eng_chat_format f, const char *template_src, const eng_chat_msg *msgs, int n,
                   bool add_generation_prompt, char **out, char *err, size_t errlen);

/* The format's short name ("chatml", "llama3", ...; see the list above). */
const char *eng_chat_format_name(eng_chat_format f);
/* The format named `name` (as eng_chat_format_name writes it), for a
 * --chat-template override; -1 if none has that name. */
int eng_chat_format_from_name(const char *name);

#endif

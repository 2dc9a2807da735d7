/* cmd_tokenize.c: `kvserve tokenize`: the token ids of a text, one line. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer.h"
#include "server/cli.h"

static const char usage[] =
    "usage: kvserve tokenize --model PATH (--text T | --file F) [--no-bos] [--special]\n\n"
    "Prints the token ids of the text, space-separated, on one line. BOS is added when\n"
    "the model asks for it (unless --no-bos); --special parses special-token text\n"
    "such as <|im_start|> into its id.";

int cmd_tokenize(int argc, char **argv) {
    const char *model = NULL, *text = NULL, *file = NULL;
    bool no_bos = false, special = false;
    const cli_flag flags[] = {
        {"--model", CLI_STR, &model, "GGUF file or Hugging Face directory"},
        {"--text", CLI_STR, &text, "text to tokenize"},
        {"--file", CLI_STR, &file, "file whose contents to tokenize"},
        {"--no-bos", CLI_BOOL, &no_bos, "never add BOS"},
        {"--special", CLI_BOOL, &special, "parse special-token text"},
        {NULL, 0, NULL, NULL},
    };
    int rc = cli_parse("tokenize", usage, flags, argc, argv);
    if (rc)
        return rc > 0 ? 0 : 2;
    if (!model || (!text == !file)) {
        fprintf(stderr, "kvserve tokenize: --model and exactly one of --text / --file are required\n");
        return 2;
    }
    size_t len = 0;
    char *buf = NULL;
    if (file) {
        buf = cli_read_file(file, &len);
        if (!buf)
            return 1;
        text = buf;
    } else {
        len = strlen(text);
    }
    char err[512];
    eng_model *m = eng_model_load(model, err, sizeof err);
    if (!m) {
        fprintf(stderr, "kvserve tokenize: cannot load model: %s\n", err);
        free(buf);
        return 1;
    }
    int cap = (int)(len < 1 << 30 ? len : 1 << 30) + 8;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    int n = ids ? eng_tokenize(m->tok, text, len, !no_bos && eng_tokenizer_add_bos(m->tok), special, ids, cap,
                               err, sizeof err) : -1;
    if (n < 0 || n > cap) {
        fprintf(stderr, "kvserve tokenize: %s\n", n < 0 ? err : "too many tokens");
        rc = 1;
    } else {
        for (int i = 0; i < n; i++)
            printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
    }
    free(ids);
    free(buf);
    eng_model_free(m);
    return rc;
}


/*
 * Copyright (C) ratepool authors
 */


#include <string.h>

#include "ratepool_request.h"


#define RQ_START            0   /* before the top-level "{" */
#define RQ_KEY_OR_END       1
#define RQ_KEY              2
#define RQ_COLON            3
#define RQ_VALUE            4
#define RQ_STRING           5
#define RQ_NUMBER           6
#define RQ_LITERAL          7
#define RQ_NESTED           8   /* an object or array, skipped */
#define RQ_AFTER_VALUE      9
#define RQ_DONE             10
#define RQ_ERROR            11  /* not a JSON object: nothing more is read */
#define RQ_CONV             12  /* a value the conversation scanner reads */
#define RQ_OPTIONS          13  /* stream_options' object */

/* in stream_options' object, at its own level */
#define RQ_OPT_KEY_OR_END   0
#define RQ_OPT_KEY          1
#define RQ_OPT_COLON        2
#define RQ_OPT_VALUE        3
#define RQ_OPT_AFTER_VALUE  4

#define RQ_KEY_OTHER        0
#define RQ_KEY_MODEL        1
#define RQ_KEY_MAX_TOKENS   2
#define RQ_KEY_STREAM       3
#define RQ_KEY_STREAM_OPTS  4
#define RQ_KEY_CONV         5   /* and on: + RATEPOOL_CONV_*, values the
                                   conversation scanner reads */

#define RQ_MAX_DIGITS       18


typedef struct {
    const char  *name;
    unsigned     id;
} ratepool_request_key_t;


static const ratepool_request_key_t  ratepool_request_keys[] = {
    { "model", RQ_KEY_MODEL },
    { "max_tokens", RQ_KEY_MAX_TOKENS },
    { "max_completion_tokens", RQ_KEY_MAX_TOKENS },
    { "max_output_tokens", RQ_KEY_MAX_TOKENS },
    { "stream", RQ_KEY_STREAM },
    { "stream_options", RQ_KEY_STREAM_OPTS },
    { "tools", RQ_KEY_CONV + RATEPOOL_CONV_TOOLS },
    { "system", RQ_KEY_CONV + RATEPOOL_CONV_SYSTEM },
    { "messages", RQ_KEY_CONV + RATEPOOL_CONV_MESSAGES },
    { "cache_control", RQ_KEY_CONV + RATEPOOL_CONV_CACHE },
    { NULL, RQ_KEY_OTHER }
};


static int ratepool_request_space(unsigned char c);
static unsigned ratepool_request_key_id(ratepool_request_t *rq);
static void ratepool_request_byte(ratepool_request_t *rq, unsigned char c,
    uint64_t at);
static void ratepool_request_options(ratepool_request_t *rq, unsigned char c,
    uint64_t at);


/* the body was one JSON object, as far as the scanner looked */

int
ratepool_request_whole(const ratepool_request_t *rq)
{
    return rq->state == RQ_DONE;
}


void
ratepool_request_init(ratepool_request_t *rq)
{
    memset(rq, 0, sizeof(ratepool_request_t));
    rq->state = RQ_START;
    rq->options_at = -1;
    rq->usage_at = -1;
    rq->model_at = -1;
    rq->model_end = -1;
    ratepool_conversation_init(&rq->conv);
}


static int
ratepool_request_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}


static unsigned
ratepool_request_key_id(ratepool_request_t *rq)
{
    const ratepool_request_key_t  *k;

    if (rq->key_len > sizeof(rq->key_text)) {
        return RQ_KEY_OTHER;
    }

    for (k = ratepool_request_keys; k->name; k++) {
        if (strlen(k->name) == rq->key_len
            && memcmp(k->name, rq->key_text, rq->key_len) == 0)
        {
            return k->id;
        }
    }

    return RQ_KEY_OTHER;
}


void
ratepool_request_feed(ratepool_request_t *rq, const unsigned char *p,
    size_t len)
{
    uint64_t              base;
    const unsigned char  *start, *end;

    start = p;
    end = p + len;
    base = rq->offset;
    rq->offset += len;

    while (p < end) {

        if (rq->state == RQ_DONE || rq->state == RQ_ERROR) {
            return;
        }

        if (rq->state == RQ_CONV) {
            p += ratepool_conversation_feed(&rq->conv, p, end - p);

            if (!rq->conv.in_value) {
                rq->state = RQ_AFTER_VALUE;
            }

            continue;
        }

        /* the bulk of a body is text of no interest: run through it */

        if ((rq->state == RQ_NESTED && rq->in_string && !rq->escape)
            || (rq->state == RQ_STRING && rq->key != RQ_KEY_MODEL
                && !rq->escape))
        {
            while (p < end && *p != '"' && *p != '\\') {
                p++;
            }

            if (p == end) {
                return;
            }

        } else if (rq->state == RQ_NESTED && !rq->in_string) {
            while (p < end && *p != '"' && *p != '{' && *p != '['
                   && *p != '}' && *p != ']')
            {
                p++;
            }

            if (p == end) {
                return;
            }
        }

        ratepool_request_byte(rq, *p, base + (p - start));
        p++;
    }
}


/* c is the byte at body offset "at" */

static void
ratepool_request_byte(ratepool_request_t *rq, unsigned char c, uint64_t at)
{
    switch (rq->state) {

    case RQ_START:
        if (c == '{') {
            rq->state = RQ_KEY_OR_END;

        } else if (!ratepool_request_space(c)) {
            rq->state = RQ_ERROR;
        }

        return;

    case RQ_KEY_OR_END:
        if (c == '"') {
            rq->state = RQ_KEY;
            rq->key_len = 0;
            rq->escape = 0;

        } else if (c == '}') {
            rq->state = RQ_DONE;
            ratepool_conversation_finish(&rq->conv);

        } else if (!ratepool_request_space(c)) {
            rq->state = RQ_ERROR;
        }

        return;

    case RQ_KEY:
        if (rq->escape) {
            rq->escape = 0;
            rq->key_len = sizeof(rq->key_text) + 1;   /* none of ours */
            return;
        }

        if (c == '\\') {
            rq->escape = 1;
            return;
        }

        if (c == '"') {
            rq->key = ratepool_request_key_id(rq);
            rq->state = RQ_COLON;

            if (rq->key == RQ_KEY_STREAM_OPTS) {
                rq->stream_options = 1;
            }

            return;
        }

        if (rq->key_len < sizeof(rq->key_text)) {
            rq->key_text[rq->key_len] = c;
        }

        if (rq->key_len <= sizeof(rq->key_text)) {
            rq->key_len++;
        }

        return;

    case RQ_COLON:
        if (c == ':') {
            rq->state = RQ_VALUE;

        } else if (!ratepool_request_space(c)) {
            rq->state = RQ_ERROR;
        }

        return;

    case RQ_VALUE:
        if (ratepool_request_space(c)) {
            return;
        }

        rq->value_bad = 0;

        if (rq->key == RQ_KEY_STREAM_OPTS) {
            /* the last stream_options is the one that counts */
            rq->options_at = (int64_t) at;
            rq->options_null = (c == 'n');
            rq->options_object = (c == '{');
            rq->options_members = 0;
            rq->usage_at = -1;
            rq->usage_value = 0;

            if (c == '{') {
                rq->state = RQ_OPTIONS;
                rq->option = RQ_OPT_KEY_OR_END;
                rq->depth = 1;
                rq->in_string = 0;
                rq->escape = 0;
                return;
            }
        }

        if (rq->key >= RQ_KEY_CONV
            && ratepool_conversation_value(&rq->conv, rq->key - RQ_KEY_CONV,
                                           at, c))
        {
            rq->state = RQ_CONV;
            (void) ratepool_conversation_feed(&rq->conv, &c, 1);

            if (!rq->conv.in_value) {
                rq->state = RQ_AFTER_VALUE;
            }

            return;
        }

        if (c == '"') {
            rq->state = RQ_STRING;
            rq->escape = 0;

            if (rq->key == RQ_KEY_MODEL) {
                rq->model_len = 0;
                rq->model_at = (int64_t) at;
                rq->model_end = -1;
            }

        } else if ((c >= '0' && c <= '9') || c == '-') {
            rq->state = RQ_NUMBER;
            rq->number = (c == '-') ? 0 : (uint64_t) (c - '0');
            rq->digits = (c == '-') ? 0 : 1;
            rq->value_bad = (c == '-');

        } else if (c == '{' || c == '[') {
            rq->state = RQ_NESTED;
            rq->depth = 1;
            rq->in_string = 0;
            rq->escape = 0;

        } else if (c == 't' || c == 'f' || c == 'n') {
            rq->state = RQ_LITERAL;

            if (rq->key == RQ_KEY_STREAM) {
                rq->stream = (c == 't');
            }

        } else {
            rq->state = RQ_ERROR;
        }

        return;

    case RQ_STRING:
        if (rq->escape) {
            rq->escape = 0;
            return;
        }

        if (c == '\\') {
            rq->escape = 1;
            rq->value_bad = 1;      /* no model name needs an escape */
            return;
        }

        if (c == '"') {
            if (rq->key == RQ_KEY_MODEL && rq->value_bad) {
                rq->model_len = 0;
            }

            if (rq->key == RQ_KEY_MODEL) {
                rq->model_end = (int64_t) at + 1;
            }

            rq->state = RQ_AFTER_VALUE;
            return;
        }

        if (rq->key == RQ_KEY_MODEL) {
            if (rq->model_len < RATEPOOL_MODEL_MAX) {
                rq->model[rq->model_len++] = c;

            } else {
                rq->value_bad = 1;
            }
        }

        return;

    case RQ_NUMBER:
        if (c >= '0' && c <= '9') {
            if (rq->digits < RQ_MAX_DIGITS) {
                rq->number = rq->number * 10 + (uint64_t) (c - '0');
                rq->digits++;

            } else {
                rq->value_bad = 1;
            }

            return;
        }

        if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') {
            rq->value_bad = 1;
            return;
        }

        if (rq->key == RQ_KEY_MAX_TOKENS && !rq->value_bad && rq->digits) {
            rq->max_tokens = rq->number;
            rq->has_max_tokens = 1;
        }

        rq->state = RQ_AFTER_VALUE;
        ratepool_request_byte(rq, c, at);
        return;

    case RQ_LITERAL:
        if (c >= 'a' && c <= 'z') {
            return;
        }

        rq->state = RQ_AFTER_VALUE;
        ratepool_request_byte(rq, c, at);
        return;

    case RQ_NESTED:
        if (rq->in_string) {
            if (rq->escape) {
                rq->escape = 0;

            } else if (c == '\\') {
                rq->escape = 1;

            } else if (c == '"') {
                rq->in_string = 0;
            }

            return;
        }

        if (c == '"') {
            rq->in_string = 1;

        } else if (c == '{' || c == '[') {
            rq->depth++;

        } else if (c == '}' || c == ']') {
            if (--rq->depth == 0) {
                rq->state = RQ_AFTER_VALUE;
            }
        }

        return;

    case RQ_OPTIONS:
        ratepool_request_options(rq, c, at);
        return;

    case RQ_AFTER_VALUE:
        if (c == ',') {
            rq->state = RQ_KEY_OR_END;

        } else if (c == '}') {
            rq->state = RQ_DONE;
            ratepool_conversation_finish(&rq->conv);

        } else if (!ratepool_request_space(c)) {
            rq->state = RQ_ERROR;
        }

        return;
    }
}


/*
 * stream_options' object, for where its include_usage value is: its own
 * members are read, anything nested in them is skipped.
 */

static void
ratepool_request_options(ratepool_request_t *rq, unsigned char c,
    uint64_t at)
{
    static const char  name[] = "include_usage";

    if (rq->in_string) {
        if (rq->escape) {
            rq->escape = 0;
            rq->key_len = sizeof(rq->key_text) + 1;     /* none of ours */

        } else if (c == '\\') {
            rq->escape = 1;

        } else if (c == '"') {
            rq->in_string = 0;

            if (rq->option == RQ_OPT_KEY) {
                rq->option_usage = (rq->key_len == sizeof(name) - 1
                                    && memcmp(rq->key_text, name,
                                              sizeof(name) - 1) == 0);
                rq->option = RQ_OPT_COLON;
            }

        } else if (rq->option == RQ_OPT_KEY) {
            if (rq->key_len < sizeof(rq->key_text)) {
                rq->key_text[rq->key_len] = c;
            }

            if (rq->key_len <= sizeof(rq->key_text)) {
                rq->key_len++;
            }
        }

        return;
    }

    if (rq->depth > 1) {
        if (c == '"') {
            rq->in_string = 1;

        } else if (c == '{' || c == '[') {
            rq->depth++;

        } else if (c == '}' || c == ']') {
            rq->depth--;
        }

        return;
    }

    if (ratepool_request_space(c)) {
        return;
    }

    switch (rq->option) {

    case RQ_OPT_KEY_OR_END:
        if (c == '"') {
            rq->option = RQ_OPT_KEY;
            rq->in_string = 1;
            rq->key_len = 0;
            rq->options_members++;
            return;
        }

        /* "}" only ends an empty object: not one after a "," */
        if (c == '}' && rq->options_members == 0) {
            rq->depth = 0;
            rq->state = RQ_AFTER_VALUE;
            return;
        }

        break;

    case RQ_OPT_COLON:
        if (c == ':') {
            rq->option = RQ_OPT_VALUE;
            return;
        }

        break;

    case RQ_OPT_VALUE:
        if (rq->option_usage) {
            rq->usage_at = (int64_t) at;
            rq->usage_value = (c == 't' || c == 'f' || c == 'n') ? c : 0;
        }

        if (c == '"') {
            rq->in_string = 1;

        } else if (c == '{' || c == '[') {
            rq->depth++;

        } else if (c == '}' || c == ']' || c == ',' || c == ':') {
            break;
        }

        rq->option = RQ_OPT_AFTER_VALUE;
        return;

    case RQ_OPT_AFTER_VALUE:
        if (c == ',') {
            rq->option = RQ_OPT_KEY_OR_END;
            return;
        }

        if (c == '}') {
            rq->depth = 0;
            rq->state = RQ_AFTER_VALUE;
            return;
        }

        /* the rest of a number or a literal */
        if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.'
            || c == '-' || c == '+' || c == 'E')
        {
            return;
        }

        break;
    }

    rq->state = RQ_ERROR;
}


int
ratepool_model_match(const unsigned char *pattern, size_t plen,
    const unsigned char *model, size_t mlen)
{
    size_t  p, m, star_p, star_m;
    int     star;

    p = 0;
    m = 0;
    star = 0;
    star_p = 0;
    star_m = 0;

    /* greedy with one backtrack point: linear in practice */

    while (m < mlen) {
        if (p < plen && pattern[p] == '*') {
            star = 1;
            star_p = ++p;
            star_m = m;

        } else if (p < plen && pattern[p] == model[m]) {
            p++;
            m++;

        } else if (star) {
            p = star_p;
            m = ++star_m;

        } else {
            return 0;
        }
    }

    while (p < plen && pattern[p] == '*') {
        p++;
    }

    return p == plen;
}


uint64_t
ratepool_estimate_input(uint64_t bytes, uint32_t rate)
{
    uint64_t  tokens;

    if (rate < RATEPOOL_RATE_MIN || rate > RATEPOOL_RATE_MAX) {
        rate = RATEPOOL_RATE_DEFAULT;
    }

    if (bytes > (1ULL << 40)) {
        bytes = 1ULL << 40;
    }

    tokens = (bytes * rate + 1024 * 1000 - 1) / (1024 * 1000);

    return tokens ? tokens : 1;
}


/*
 * A moving average over about eight requests; bodies under a KiB say
 * too little of the rate to move it.
 */

uint32_t
ratepool_estimate_learn(uint32_t rate, uint64_t bytes, uint64_t counted)
{
    uint64_t  sample;

    if (rate < RATEPOOL_RATE_MIN || rate > RATEPOOL_RATE_MAX) {
        rate = RATEPOOL_RATE_DEFAULT;
    }

    if (bytes < 1024) {
        return rate;
    }

    if (bytes > (1ULL << 40)) {
        bytes = 1ULL << 40;
    }

    if (counted > bytes) {
        counted = bytes;
    }

    sample = counted * 1024 * 1000 / bytes;

    if (sample < RATEPOOL_RATE_MIN) {
        sample = RATEPOOL_RATE_MIN;
    }

    if (sample > RATEPOOL_RATE_MAX) {
        sample = RATEPOOL_RATE_MAX;
    }

    return (uint32_t) (((uint64_t) rate * 7 + sample + 7) / 8);
}


uint64_t
ratepool_estimate_output(uint64_t avg, uint64_t cap)
{
    uint64_t  expect;

    if (avg == 0) {
        return cap;
    }

    if (avg > (1ULL << 40)) {
        avg = 1ULL << 40;
    }

    expect = avg + avg / 4 + 16;

    return expect < cap ? expect : cap;
}


/* a moving average over about eight answers */

uint64_t
ratepool_estimate_output_learn(uint64_t avg, uint64_t produced)
{
    if (produced > (1ULL << 40)) {
        produced = 1ULL << 40;
    }

    if (avg == 0) {
        return produced ? produced : 1;
    }

    if (produced >= avg) {
        return avg + (produced - avg + 7) / 8;
    }

    return avg - (avg - produced) / 8;
}


int
ratepool_json_members(const unsigned char *body, size_t len,
    ratepool_member_t *members, int max)
{
    int                   n, depth, in_string, escape;
    size_t                i;
    unsigned char         c;
    ratepool_member_t    *m;

    i = 0;

    while (i < len && ratepool_request_space(body[i])) {
        i++;
    }

    if (i == len || body[i] != '{') {
        return -1;
    }

    n = 0;
    i++;

    for ( ;; ) {
        while (i < len && (ratepool_request_space(body[i]) || body[i] == ','))
        {
            i++;
        }

        if (i == len) {
            return -1;
        }

        if (body[i] == '}') {
            break;
        }

        if (body[i] != '"' || n == max) {
            return -1;
        }

        m = &members[n++];
        m->start = i;

        /* the key */
        for (i++, escape = 0; i < len; i++) {
            if (escape) {
                escape = 0;

            } else if (body[i] == '\\') {
                escape = 1;

            } else if (body[i] == '"') {
                break;
            }
        }

        if (i == len) {
            return -1;
        }

        m->key_len = i - m->start - 1;

        for (i++; i < len && ratepool_request_space(body[i]); i++) {
            /* void */
        }

        if (i == len || body[i] != ':') {
            return -1;
        }

        for (i++; i < len && ratepool_request_space(body[i]); i++) {
            /* void */
        }

        /* the value: up to a "," or "}" outside strings and containers */
        depth = 0;
        in_string = 0;
        escape = 0;

        for ( /* void */ ; i < len; i++) {
            c = body[i];

            if (in_string) {
                if (escape) {
                    escape = 0;

                } else if (c == '\\') {
                    escape = 1;

                } else if (c == '"') {
                    in_string = 0;
                }

                continue;
            }

            if (c == '"') {
                in_string = 1;

            } else if (c == '{' || c == '[') {
                depth++;

            } else if ((c == '}' || c == ']') && depth > 0) {
                depth--;

            } else if ((c == ',' || c == '}') && depth == 0) {
                break;
            }
        }

        if (i == len) {
            return -1;
        }

        m->end = i;

        while (m->end > m->start && ratepool_request_space(body[m->end - 1])) {
            m->end--;
        }
    }

    return n;
}

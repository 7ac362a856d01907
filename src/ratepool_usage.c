
/*
 * Copyright (C) ratepool authors
 */


#include <string.h>

#include "ratepool_usage.h"


/* SSE line states */
#define SSE_LINE_START      0
#define SSE_FIELD           1
#define SSE_VALUE_START     2
#define SSE_VALUE           3
#define SSE_IGNORE          4

/* SSE fields that matter */
#define SSE_FIELD_OTHER     0
#define SSE_FIELD_DATA      1
#define SSE_FIELD_EVENT     2

/* JSON states */
#define JSON_VALUE          0   /* a value is expected */
#define JSON_KEY_OR_END     1   /* in an object: a key or "}" */
#define JSON_KEY            2
#define JSON_COLON          3
#define JSON_STRING         4
#define JSON_NUMBER         5
#define JSON_LITERAL        6
#define JSON_AFTER_VALUE    7
#define JSON_DONE           8   /* the top-level value is complete */
#define JSON_ERROR          9   /* not JSON, or not ours: ignored */

/* object keys that matter; everything else is KEY_OTHER */
#define KEY_OTHER           0
#define KEY_ROOT            1
#define KEY_USAGE           2
#define KEY_MESSAGE         3
#define KEY_RESPONSE        4
#define KEY_INPUT           5
#define KEY_OUTPUT          6
#define KEY_PROMPT          7
#define KEY_COMPLETION      8
#define KEY_CACHE_CREATION  9
#define KEY_CACHE_READ      10
#define KEY_CACHED          11
#define KEY_PROMPT_DETAILS  12
#define KEY_INPUT_DETAILS   13
#define KEY_DELTA           14  /* a streamed piece (a string, OpenAI's
                                   Responses), or an object holding one */
#define KEY_TEXT            15  /* generated text, in a "delta" */

/* 64 levels of nesting are more than any provider sends */
#define JSON_MAX_DEPTH      64
#define JSON_MAX_DIGITS     18


typedef struct {
    const char  *name;
    unsigned     id;
} ratepool_usage_key_t;


static const ratepool_usage_key_t  ratepool_usage_keys[] = {
    { "usage", KEY_USAGE },
    { "message", KEY_MESSAGE },
    { "response", KEY_RESPONSE },
    { "input_tokens", KEY_INPUT },
    { "output_tokens", KEY_OUTPUT },
    { "prompt_tokens", KEY_PROMPT },
    { "completion_tokens", KEY_COMPLETION },
    { "cache_creation_input_tokens", KEY_CACHE_CREATION },
    { "cache_read_input_tokens", KEY_CACHE_READ },
    { "cached_tokens", KEY_CACHED },
    { "prompt_tokens_details", KEY_PROMPT_DETAILS },
    { "input_tokens_details", KEY_INPUT_DETAILS },
    { "delta", KEY_DELTA },
    { "text", KEY_TEXT },
    { "thinking", KEY_TEXT },
    { "partial_json", KEY_TEXT },
    { "content", KEY_TEXT },
    { "arguments", KEY_TEXT },
    { "refusal", KEY_TEXT },
    { NULL, KEY_OTHER }
};


static void ratepool_json_reset(ratepool_usage_scanner_t *s);
static unsigned ratepool_key_id(ratepool_usage_scanner_t *s);
static void ratepool_usage_number(ratepool_usage_scanner_t *s,
    unsigned field);
static void ratepool_json_push(ratepool_usage_scanner_t *s, int array);
static void ratepool_json_pop(ratepool_usage_scanner_t *s, int array);
static int ratepool_json_space(unsigned char c);
static void ratepool_json_byte(ratepool_usage_scanner_t *s, unsigned char c);
static void ratepool_json_feed(ratepool_usage_scanner_t *s,
    const unsigned char *p, const unsigned char *end);
static void ratepool_sse_dispatch(ratepool_usage_scanner_t *s);
static void ratepool_sse_end_line(ratepool_usage_scanner_t *s);
static void ratepool_sse_byte(ratepool_usage_scanner_t *s, unsigned char c);


void
ratepool_usage_init(ratepool_usage_scanner_t *s, int sse)
{
    memset(s, 0, sizeof(ratepool_usage_scanner_t));

    s->sse = sse ? 1 : 0;
    ratepool_json_reset(s);
}


static void
ratepool_json_reset(ratepool_usage_scanner_t *s)
{
    s->json_state = JSON_VALUE;
    s->escape = 0;
    s->depth = 0;
    s->arrays = 0;
    s->key_len = 0;
    s->value_key = KEY_ROOT;
    s->digits = 0;
    s->delta_depth = 0;
    s->text = 0;
}


static unsigned
ratepool_key_id(ratepool_usage_scanner_t *s)
{
    const ratepool_usage_key_t  *k;

    if (s->key_len > RATEPOOL_USAGE_KEY_MAX) {
        return KEY_OTHER;
    }

    for (k = ratepool_usage_keys; k->name; k++) {
        if (strlen(k->name) == s->key_len
            && memcmp(k->name, s->key, s->key_len) == 0)
        {
            return k->id;
        }
    }

    return KEY_OTHER;
}


/*
 * A whole number was read under key "field" in the innermost object:
 * it counts if that object is the document's "usage" (or its
 * "message.usage", "response.usage"), or the details object in one.
 */

static void
ratepool_usage_number(ratepool_usage_scanner_t *s, unsigned field)
{
    unsigned           usage_at;
    uint64_t          *value;
    ratepool_usage_t  *u;

    if (s->depth < 2 || s->depth > 4
        || (s->arrays & ((1ULL << s->depth) - 1)))
    {
        return;      /* too shallow, too deep, or inside an array */
    }

    if (s->frame_key[1] == KEY_USAGE) {
        usage_at = 1;

    } else if ((s->frame_key[1] == KEY_MESSAGE
                || s->frame_key[1] == KEY_RESPONSE)
               && s->depth >= 3 && s->frame_key[2] == KEY_USAGE)
    {
        usage_at = 2;

    } else {
        return;
    }

    u = &s->usage;

    if (s->depth == usage_at + 2) {
        if ((s->frame_key[usage_at + 1] == KEY_PROMPT_DETAILS
             || s->frame_key[usage_at + 1] == KEY_INPUT_DETAILS)
            && field == KEY_CACHED)
        {
            u->cached_tokens = s->number;
            u->seen |= RATEPOOL_USAGE_CACHED;
        }

        return;
    }

    if (s->depth != usage_at + 1) {
        return;
    }

    switch (field) {

    case KEY_INPUT:
    case KEY_PROMPT:
        value = &u->input_tokens;
        u->seen |= RATEPOOL_USAGE_INPUT;
        break;

    case KEY_OUTPUT:
    case KEY_COMPLETION:
        value = &u->output_tokens;
        u->seen |= RATEPOOL_USAGE_OUTPUT;

        /* Anthropic's message_start says 1, before any is produced */
        if (s->frame_key[1] != KEY_MESSAGE) {
            u->seen |= RATEPOOL_USAGE_FINAL;
        }

        break;

    case KEY_CACHE_CREATION:
        value = &u->cache_creation_input_tokens;
        u->seen |= RATEPOOL_USAGE_CACHE_CREATION;
        break;

    case KEY_CACHE_READ:
        value = &u->cache_read_input_tokens;
        u->seen |= RATEPOOL_USAGE_CACHE_READ;
        break;

    default:
        return;
    }

    *value = s->number;
}


static void
ratepool_json_push(ratepool_usage_scanner_t *s, int array)
{
    if (s->depth == JSON_MAX_DEPTH) {
        s->json_state = JSON_ERROR;
        return;
    }

    if (s->depth < RATEPOOL_USAGE_DEPTH) {
        s->frame_key[s->depth] = (unsigned char) s->value_key;
    }

    if (array) {
        s->arrays |= 1ULL << s->depth;

    } else {
        s->arrays &= ~(1ULL << s->depth);
    }

    s->depth++;

    if (s->value_key == KEY_DELTA && s->delta_depth == 0) {
        s->delta_depth = s->depth;
    }

    s->json_state = array ? JSON_VALUE : JSON_KEY_OR_END;
    s->value_key = KEY_OTHER;
}


static void
ratepool_json_pop(ratepool_usage_scanner_t *s, int array)
{
    if (s->depth == 0
        || ((s->arrays >> (s->depth - 1)) & 1) != (unsigned) array)
    {
        s->json_state = JSON_ERROR;
        return;
    }

    s->depth--;

    if (s->depth < s->delta_depth) {
        s->delta_depth = 0;
    }

    s->json_state = s->depth ? JSON_AFTER_VALUE : JSON_DONE;
}


static int
ratepool_json_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}


static void
ratepool_json_byte(ratepool_usage_scanner_t *s, unsigned char c)
{
    switch (s->json_state) {

    case JSON_VALUE:
        if (ratepool_json_space(c)) {
            return;
        }

        if (c == '{') {
            ratepool_json_push(s, 0);

        } else if (c == '[') {
            ratepool_json_push(s, 1);

        } else if (c == ']' && s->depth
                   && ((s->arrays >> (s->depth - 1)) & 1))
        {
            ratepool_json_pop(s, 1);    /* an empty array */

        } else if (c == '"') {
            s->json_state = JSON_STRING;
            s->text = (s->value_key == KEY_DELTA
                       || (s->value_key == KEY_TEXT && s->delta_depth));

        } else if ((c >= '0' && c <= '9') || c == '-') {
            s->json_state = JSON_NUMBER;
            s->number = 0;
            s->digits = 0;
            s->number_bad = (c == '-');

            if (c != '-') {
                s->number = (uint64_t) (c - '0');
                s->digits = 1;
            }

        } else if (c == 't' || c == 'f' || c == 'n') {
            s->json_state = JSON_LITERAL;

        } else {
            s->json_state = JSON_ERROR;
        }

        return;

    case JSON_KEY_OR_END:
        if (ratepool_json_space(c)) {
            return;
        }

        if (c == '"') {
            s->json_state = JSON_KEY;
            s->key_len = 0;

        } else if (c == '}') {
            ratepool_json_pop(s, 0);

        } else {
            s->json_state = JSON_ERROR;
        }

        return;

    case JSON_KEY:
        if (s->escape) {
            s->escape = 0;
            s->key_len = RATEPOOL_USAGE_KEY_MAX + 1;   /* never ours */
            return;
        }

        if (c == '\\') {
            s->escape = 1;

        } else if (c == '"') {
            s->value_key = ratepool_key_id(s);
            s->json_state = JSON_COLON;

        } else if (s->key_len < RATEPOOL_USAGE_KEY_MAX) {
            s->key[s->key_len++] = c;

        } else {
            s->key_len = RATEPOOL_USAGE_KEY_MAX + 1;
        }

        return;

    case JSON_COLON:
        if (ratepool_json_space(c)) {
            return;
        }

        s->json_state = (c == ':') ? JSON_VALUE : JSON_ERROR;
        return;

    case JSON_STRING:
        if (s->escape) {
            s->escape = 0;
            s->usage.text_bytes += s->text;

        } else if (c == '\\') {
            s->escape = 1;

        } else if (c == '"') {
            s->json_state = s->depth ? JSON_AFTER_VALUE : JSON_DONE;

        } else {
            s->usage.text_bytes += s->text;
        }

        return;

    case JSON_NUMBER:
        if (c >= '0' && c <= '9') {
            if (++s->digits > JSON_MAX_DIGITS) {
                s->number_bad = 1;

            } else {
                s->number = s->number * 10 + (uint64_t) (c - '0');
            }

            return;
        }

        if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') {
            s->number_bad = 1;   /* not a count of tokens */
            return;
        }

        if (!s->number_bad && s->digits) {
            ratepool_usage_number(s, s->value_key);
        }

        s->json_state = s->depth ? JSON_AFTER_VALUE : JSON_DONE;
        ratepool_json_byte(s, c);
        return;

    case JSON_LITERAL:
        if (c >= 'a' && c <= 'z') {
            return;
        }

        s->json_state = s->depth ? JSON_AFTER_VALUE : JSON_DONE;
        ratepool_json_byte(s, c);
        return;

    case JSON_AFTER_VALUE:
        if (ratepool_json_space(c)) {
            return;
        }

        if (c == ',') {
            s->json_state = ((s->arrays >> (s->depth - 1)) & 1)
                            ? JSON_VALUE : JSON_KEY_OR_END;
            s->value_key = KEY_OTHER;

        } else if (c == '}') {
            ratepool_json_pop(s, 0);

        } else if (c == ']') {
            ratepool_json_pop(s, 1);

        } else {
            s->json_state = JSON_ERROR;
        }

        return;

    case JSON_DONE:
        if (!ratepool_json_space(c)) {
            s->json_state = JSON_ERROR;
        }

        return;

    default:    /* JSON_ERROR */
        return;
    }
}


/* an SSE event is complete: its data was one JSON document */

static void
ratepool_sse_dispatch(ratepool_usage_scanner_t *s)
{
    if (s->data_lines) {
        ratepool_usage_finish(s);
        s->usage.events++;
    }

    if (s->event_len == 5 && memcmp(s->event, "error", 5) == 0) {
        s->usage.error_event = 1;
    }

    s->data_lines = 0;
    s->event_len = 0;
    ratepool_json_reset(s);
}


static void
ratepool_sse_end_line(ratepool_usage_scanner_t *s)
{
    if (s->line_state == SSE_FIELD) {
        /* a field name alone is a field with an empty value */
        s->field = (s->field_len == 4
                    && memcmp(s->field_name, "data", 4) == 0)
                   ? SSE_FIELD_DATA : SSE_FIELD_OTHER;
    }

    if (s->line_state != SSE_IGNORE && s->field == SSE_FIELD_DATA) {
        /* data lines of one event are joined by newlines, JSON space */
        s->data_lines++;
        ratepool_json_byte(s, '\n');
    }

    s->line_state = SSE_LINE_START;
}


static void
ratepool_sse_byte(ratepool_usage_scanner_t *s, unsigned char c)
{
    if (s->after_cr) {
        s->after_cr = 0;

        if (c == '\n') {
            return;     /* the LF of a CRLF */
        }
    }

    if (c == '\r' || c == '\n') {
        s->after_cr = (c == '\r');

        if (s->line_state == SSE_LINE_START) {
            ratepool_sse_dispatch(s);
            return;
        }

        ratepool_sse_end_line(s);
        return;
    }

    switch (s->line_state) {

    case SSE_LINE_START:
        if (c == ':') {
            s->line_state = SSE_IGNORE;     /* a comment */
            return;
        }

        s->line_state = SSE_FIELD;
        s->field_len = 0;
        /* fall through */

    case SSE_FIELD:
        if (c == ':') {
            if (s->field_len == 4 && memcmp(s->field_name, "data", 4) == 0) {
                s->field = SSE_FIELD_DATA;

            } else if (s->field_len == 5
                       && memcmp(s->field_name, "event", 5) == 0)
            {
                s->field = SSE_FIELD_EVENT;
                s->event_len = 0;

            } else {
                s->field = SSE_FIELD_OTHER;
            }

            s->line_state = SSE_VALUE_START;
            return;
        }

        if (s->field_len < sizeof(s->field_name)) {
            s->field_name[s->field_len] = c;
        }

        if (s->field_len <= sizeof(s->field_name)) {
            s->field_len++;
        }

        return;

    case SSE_VALUE_START:
        s->line_state = SSE_VALUE;

        if (c == ' ') {
            return;     /* one space after the colon is not data */
        }

        /* fall through */

    case SSE_VALUE:
        if (s->field == SSE_FIELD_DATA) {
            ratepool_json_byte(s, c);

        } else if (s->field == SSE_FIELD_EVENT) {
            if (s->event_len < sizeof(s->event)) {
                s->event[s->event_len] = c;
            }

            if (s->event_len <= sizeof(s->event)) {
                s->event_len++;
            }
        }

        return;

    default:    /* SSE_IGNORE */
        return;
    }
}


/*
 * Most of an answer is text inside JSON strings: runs of it are skipped
 * with a tight loop instead of a call per byte.
 */

static void
ratepool_json_feed(ratepool_usage_scanner_t *s, const unsigned char *p,
    const unsigned char *end)
{
    size_t                n;
    const unsigned char  *run;

    while (p < end) {

        if (s->json_state == JSON_ERROR) {
            return;
        }

        if ((s->json_state == JSON_STRING || s->json_state == JSON_KEY)
            && !s->escape)
        {
            for (run = p; p < end && *p != '"' && *p != '\\'; p++) {
                /* void */
            }

            if (s->json_state == JSON_STRING) {
                s->usage.text_bytes += s->text ? (size_t) (p - run) : 0;

            } else if (p > run) {
                n = p - run;

                if (s->key_len + n <= RATEPOOL_USAGE_KEY_MAX) {
                    memcpy(s->key + s->key_len, run, n);
                    s->key_len += n;

                } else {
                    s->key_len = RATEPOOL_USAGE_KEY_MAX + 1;
                }
            }

            if (p == end) {
                return;
            }
        }

        ratepool_json_byte(s, *p++);
    }
}


void
ratepool_usage_feed(ratepool_usage_scanner_t *s, const unsigned char *p,
    size_t len)
{
    const unsigned char  *end, *eol;

    end = p + len;

    if (!s->sse) {
        ratepool_json_feed(s, p, end);
        return;
    }

    while (p < end) {

        if (s->line_state == SSE_VALUE && s->field == SSE_FIELD_DATA
            && !s->after_cr)
        {
            /* a data line's value goes to JSON up to the end of the line */
            for (eol = p; eol < end && *eol != '\r' && *eol != '\n'; eol++) {
                /* void */
            }

            ratepool_json_feed(s, p, eol);
            p = eol;

            if (p == end) {
                return;
            }
        }

        ratepool_sse_byte(s, *p++);
    }
}


/* the document ended: a number at its very end is complete now */

void
ratepool_usage_finish(ratepool_usage_scanner_t *s)
{
    if (s->json_state == JSON_NUMBER && !s->number_bad && s->digits) {
        ratepool_usage_number(s, s->value_key);
    }

    s->json_state = JSON_DONE;
}


/*
 * OpenAI counts cached tokens inside prompt_tokens; Anthropic counts
 * cache reads beside input_tokens.  Usage is kept the Anthropic way, so
 * that cache reads count toward ITPM (or not) alike for both.
 */

void
ratepool_usage_normalize(ratepool_usage_t *u)
{
    uint64_t  cached;

    if (!(u->seen & RATEPOOL_USAGE_CACHED)
        || (u->seen & RATEPOOL_USAGE_CACHE_READ))
    {
        return;
    }

    cached = u->cached_tokens < u->input_tokens ? u->cached_tokens
                                                : u->input_tokens;

    u->input_tokens -= cached;
    u->cache_read_input_tokens = cached;
    u->seen |= RATEPOOL_USAGE_CACHE_READ;
    u->cached_tokens = 0;
    u->seen &= ~RATEPOOL_USAGE_CACHED;
}


/* after "name": optional spaces, ':', optional spaces, then c */

static int
ratepool_json_key_then(const unsigned char *ev, size_t len,
    const char *name, const char *then)
{
    size_t  i, j, n, k, m;

    n = strlen(name);
    m = strlen(then);

    for (i = 0; i + n <= len; i++) {
        if (memcmp(ev + i, name, n) != 0) {
            continue;
        }

        j = i + n;

        while (j < len && (ev[j] == ' ' || ev[j] == '\t')) {
            j++;
        }

        if (j == len || ev[j] != ':') {
            continue;
        }

        for (k = 0, j++; k < m; k++, j++) {
            while (j < len && (ev[j] == ' ' || ev[j] == '\t')) {
                j++;
            }

            if (j == len || ev[j] != (unsigned char) then[k]) {
                break;
            }
        }

        if (k == m) {
            return 1;
        }
    }

    return 0;
}


int
ratepool_usage_only_event(const unsigned char *ev, size_t len)
{
    return ratepool_json_key_then(ev, len, "\"choices\"", "[]")
           && ratepool_json_key_then(ev, len, "\"usage\"", "{");
}


int
ratepool_usage_estimate(ratepool_usage_t *u,
    const ratepool_usage_guess_t *guess, int answer, int sse, int whole)
{
    int       estimated;
    uint64_t  output;

    estimated = 0;

    if (!(u->seen & RATEPOOL_USAGE_INPUT)) {
        u->input_tokens = guess->input;
        u->cache_read_input_tokens = guess->input_full > guess->input
                                     ? guess->input_full - guess->input : 0;
        u->cache_creation_input_tokens = 0;
        u->cached_tokens = 0;
        u->seen &= ~RATEPOOL_USAGE_CACHED;
        estimated = 1;
    }

    if (answer == RATEPOOL_USAGE_UNANSWERED
        || (u->seen & RATEPOOL_USAGE_FINAL)
        || (whole && !sse && (u->seen & RATEPOOL_USAGE_INPUT)))
    {
        output = u->output_tokens;

    } else if (answer == RATEPOOL_USAGE_UNREAD || !sse) {
        output = guess->output;

    } else {
        output = (u->text_bytes + 3) / 4;
    }

    if (output > u->output_tokens) {
        u->output_tokens = output;
        estimated = 1;
    }

    if (estimated) {
        u->seen |= RATEPOOL_USAGE_ESTIMATED;
    }

    return estimated;
}


int
ratepool_usage_clamp(ratepool_usage_t *u)
{
    int        clamped;
    size_t     i;
    uint64_t  *count[5];

    count[0] = &u->input_tokens;
    count[1] = &u->output_tokens;
    count[2] = &u->cache_creation_input_tokens;
    count[3] = &u->cache_read_input_tokens;
    count[4] = &u->cached_tokens;

    clamped = 0;

    for (i = 0; i < 5; i++) {
        if (*count[i] > RATEPOOL_USAGE_TOKENS_MAX) {
            *count[i] = RATEPOOL_USAGE_TOKENS_MAX;
            clamped = 1;
        }
    }

    return clamped;
}

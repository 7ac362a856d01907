
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_USAGE_H_INCLUDED_
#define _RATEPOOL_USAGE_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


/*
 * Reads token usage from a provider's answer as it passes, in pieces
 * split anywhere: a JSON body, or an SSE stream whose data lines are
 * JSON.  Constant memory, no copies of the answer; nothing outside a
 * document's top-level "usage" object (or "message.usage",
 * "response.usage") can match, so text the model generates cannot.
 * Later values replace earlier ones: Anthropic's message_delta usage is
 * cumulative, and the last report is the whole request's.
 */

#define RATEPOOL_USAGE_INPUT           0x01  /* input_tokens, prompt_tokens */
#define RATEPOOL_USAGE_OUTPUT          0x02  /* output_tokens,
                                                completion_tokens */
#define RATEPOOL_USAGE_CACHE_CREATION  0x04
#define RATEPOOL_USAGE_CACHE_READ      0x08
#define RATEPOOL_USAGE_CACHED          0x10  /* OpenAI: a part of input */
#define RATEPOOL_USAGE_FINAL           0x20  /* output from the last report,
                                                not Anthropic's first */
#define RATEPOOL_USAGE_ESTIMATED       0x40  /* some of it is a guess */

#define RATEPOOL_USAGE_DEPTH           6     /* object levels tracked */
#define RATEPOOL_USAGE_KEY_MAX         32


typedef struct {
    uint64_t         input_tokens;
    uint64_t         output_tokens;
    uint64_t         cache_creation_input_tokens;
    uint64_t         cache_read_input_tokens;
    uint64_t         cached_tokens;
    uint64_t         text_bytes;         /* of text streamed, in deltas */
    unsigned         seen;               /* RATEPOOL_USAGE_* */
    unsigned         error_event:1;      /* an SSE "error" event */
    unsigned         events;             /* SSE events completed */
} ratepool_usage_t;


typedef struct {
    ratepool_usage_t  usage;

    /* SSE framing */
    unsigned          sse:1;
    unsigned          after_cr:1;
    unsigned          line_state;
    unsigned          field;             /* which field this line is */
    unsigned          field_len;
    unsigned char     field_name[8];
    unsigned          event_len;
    unsigned char     event[16];
    unsigned          data_lines;

    /* JSON */
    unsigned          json_state;
    unsigned          escape:1;
    unsigned          number_bad:1;
    unsigned          depth;             /* containers open */
    uint64_t          arrays;            /* bit d: container d is an array */
    unsigned char     frame_key[RATEPOOL_USAGE_DEPTH];
    unsigned char     key[RATEPOOL_USAGE_KEY_MAX];
    unsigned          key_len;
    unsigned          value_key;         /* key of the value being read */
    unsigned          delta_depth;       /* inside a "delta" object: its
                                            depth, else 0 */
    unsigned          text:1;            /* a string of generated text */
    uint64_t          number;
    unsigned          digits;
} ratepool_usage_scanner_t;


void ratepool_usage_init(ratepool_usage_scanner_t *s, int sse);
void ratepool_usage_feed(ratepool_usage_scanner_t *s, const unsigned char *p,
    size_t len);
void ratepool_usage_finish(ratepool_usage_scanner_t *s);


/* OpenAI's cached tokens, a part of its prompt_tokens, as cache reads */
void ratepool_usage_normalize(ratepool_usage_t *u);

/*
 * What is filled in where an answer did not say what it used: a request
 * sent and never answered is charged its input; an answer that could not
 * be read (compressed, an unknown type) its input and reserved output;
 * one cut short, or that never reported all of it, the output its text
 * carried (a token per 4 bytes), or, not streamed, its reserved output.
 * A whole answer that reported usage is taken at its word (an embedding
 * reports no output: it had none).
 * Returns whether anything was, and marks the usage RATEPOOL_USAGE_
 * ESTIMATED.
 */

#define RATEPOOL_USAGE_UNANSWERED      0
#define RATEPOOL_USAGE_UNREAD          1
#define RATEPOOL_USAGE_READ            2

typedef struct {
    uint64_t         input;              /* what the org counts of it */
    uint64_t         input_full;         /* all of the prompt, cached or
                                            not */
    uint64_t         output;             /* reserved */
} ratepool_usage_guess_t;

int ratepool_usage_estimate(ratepool_usage_t *u,
    const ratepool_usage_guess_t *guess, int answer, int sse, int whole);


/*
 * No request uses more than this of any kind of token (context windows
 * are a few million): a count above it is a provider's error or a lie,
 * and is counted as this much.  Returns whether any count was.
 */
#define RATEPOOL_USAGE_TOKENS_MAX      100000000

int ratepool_usage_clamp(ratepool_usage_t *u);


/*
 * Whether an SSE event is OpenAI's usage chunk (no choices, a usage
 * object), which a client that did not ask for it must not get.
 */
int ratepool_usage_only_event(const unsigned char *ev, size_t len);


#endif /* _RATEPOOL_USAGE_H_INCLUDED_ */

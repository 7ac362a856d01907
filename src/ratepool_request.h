
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_REQUEST_H_INCLUDED_
#define _RATEPOOL_REQUEST_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>

#include "ratepool_conversation.h"


/*
 * Reads what admission needs from a request body as it comes, in pieces
 * split anywhere: the top-level "model", the output cap ("max_tokens",
 * or OpenAI's "max_completion_tokens", "max_output_tokens"), "stream"
 * and whether OpenAI's "stream_options" is there.  The values of
 * "tools", "system", "messages" and "cache_control" go to the
 * conversation scanner (conv); everything else nested is skipped without
 * being looked at, so nothing a user wrote can match.
 */

#define RATEPOOL_MODEL_MAX      128


typedef struct {
    unsigned char            model[RATEPOOL_MODEL_MAX];
    size_t                   model_len;    /* 0: none, or not a plain
                                              string */
    int64_t                  model_at;     /* its value's offsets, quotes
                                              included: -1, none */
    int64_t                  model_end;
    uint64_t                 max_tokens;
    unsigned                 has_max_tokens:1;
    unsigned                 stream:1;
    unsigned                 stream_options:1;  /* OpenAI's, the client's */
    ratepool_conversation_t  conv;         /* hashes once the body is whole */

    /*
     * Where the gateway may ask for usage in the client's own
     * stream_options: the offset of its value (-1: none), whether that
     * is null or an object, how many members it has; the offset of its
     * include_usage value (-1: none) and that value's first byte ('t',
     * 'f', 'n', or 0 for anything else).
     */
    int64_t                  options_at;
    unsigned                 options_null:1;
    unsigned                 options_object:1;
    unsigned                 options_members;
    int64_t                  usage_at;
    unsigned char            usage_value;

    /* scanner state */
    unsigned                 state;
    unsigned                 depth;        /* of nested containers skipped */
    unsigned                 in_string:1;
    unsigned                 escape:1;
    unsigned                 value_bad:1;
    unsigned                 key;          /* which top-level key */
    unsigned                 option;       /* state in stream_options */
    unsigned                 option_usage:1;   /* its key: include_usage */
    unsigned                 key_len;
    unsigned char            key_text[24];
    uint64_t                 number;
    unsigned                 digits;
    uint64_t                 offset;       /* of the next byte fed */
} ratepool_request_t;


void ratepool_request_init(ratepool_request_t *rq);
int ratepool_request_whole(const ratepool_request_t *rq);
void ratepool_request_feed(ratepool_request_t *rq, const unsigned char *p,
    size_t len);

/*
 * A JSON object's own members, whole: for each, where its key's opening
 * quote is and where its value ends, into at most max ranges.  Returns
 * their number, or -1 if the body is not one JSON object or has more.
 */

typedef struct {
    size_t                   start;
    size_t                   end;
    size_t                   key_len;   /* the key, without its quotes */
} ratepool_member_t;

int ratepool_json_members(const unsigned char *body, size_t len,
    ratepool_member_t *members, int max);

/* does a model name match a pattern where "*" stands for any run */
int ratepool_model_match(const unsigned char *pattern, size_t plen,
    const unsigned char *model, size_t mlen);

/*
 * Input tokens a body of "bytes" is expected to count, at a rate in
 * milli-tokens per KiB, and that rate corrected by what one request of
 * that size really counted: providers count cached prompt text at no or
 * low cost, so the rate a workspace's requests count at is learned.
 */

#define RATEPOOL_RATE_DEFAULT   256000      /* 4 bytes a token */
#define RATEPOOL_RATE_MIN       1000        /* a token per KiB */
#define RATEPOOL_RATE_MAX       1024000     /* a token per byte */

uint64_t ratepool_estimate_input(uint64_t bytes, uint32_t rate);
uint32_t ratepool_estimate_learn(uint32_t rate, uint64_t bytes,
    uint64_t counted);

/*
 * Output tokens a request is expected to produce: what a workspace's
 * requests produced lately (a moving average, avg, 0 while none has
 * answered), a quarter more and a little, and never more than its cap
 * (its max_tokens, or ratepool_output_reserve); the cap itself while
 * nothing is known.
 */

uint64_t ratepool_estimate_output(uint64_t avg, uint64_t cap);
uint64_t ratepool_estimate_output_learn(uint64_t avg, uint64_t produced);


#endif /* _RATEPOOL_REQUEST_H_INCLUDED_ */

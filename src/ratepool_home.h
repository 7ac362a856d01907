
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_HOME_H_INCLUDED_
#define _RATEPOOL_HOME_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


/*
 * A conversation's home: the org whose prompt cache holds it.  A turn
 * sent there reads what the last turn cached and writes only what is new
 * since; sent anywhere else, it writes its whole prompt into a cold
 * cache, at 1.25 times the price, and all of it counts toward that org's
 * input tokens per minute.
 */

#define RATEPOOL_HOME_TTL_MS        300000      /* the provider's cache */
#define RATEPOOL_HOME_TTL_LONG_MS   3600000     /* "ttl":"1h" */

/*
 * Providers cache prompts of 1,024 tokens and more (Anthropic where a
 * request marks them with cache_control, OpenAI all of them): a smaller
 * body, at about 4 bytes a token, has no cache to keep warm.
 */
#define RATEPOOL_HOME_MIN_BYTES     4096

/*
 * An org a turn was sent to has its tools and system once it answers:
 * marked as much while the turn runs, for no longer than this unless an
 * answer confirms it, so that a try that failed marks nothing for long.
 */
#define RATEPOOL_HOME_PENDING_MS    30000

/* a home whose destination's limit is unknown is waited for this long */
#define RATEPOOL_HOME_WAIT_MS       5000


/* what a conversation's last turn said of its prompt */

typedef struct {
    uint64_t         bytes;     /* of its body */
    uint64_t         total;     /* input tokens: uncached, read, written */
    uint64_t         cached;    /* read from the cache or written to it */
} ratepool_turn_t;


/*
 * The key a conversation is known by: what identifies it (a client's
 * session and agent ids, or the hash of the body's stable prefix), for
 * one model, since each model has a cache of its own.
 */
uint64_t ratepool_home_key(uint64_t id, const unsigned char *model,
    size_t model_len);

/*
 * A turn of "bytes" after "last": its input tokens in all (*full), as
 * the conversation's own bytes counted, and those that count toward its
 * home's input tokens per minute (*home): what is beyond the prefix the
 * last turn cached.  A body shorter than the last one was rewritten (a
 * compacted conversation): nothing of it is cached, unless "last" is a
 * prefix shared by conversations ("shared"), which may well be longer.
 * Returns 0 if the last turn says nothing of it.
 */
int ratepool_home_cost(const ratepool_turn_t *last, uint64_t bytes,
    int shared, uint64_t *full, uint64_t *home);

/*
 * How long a turn may wait for its home before moving costs more: the
 * time another org's input tokens per minute ("itpm", 0: unknown) need
 * to refill what the move writes there that the home would not.
 */
uint64_t ratepool_home_move_ms(uint64_t full, uint64_t home, uint64_t itpm);


#endif /* _RATEPOOL_HOME_H_INCLUDED_ */

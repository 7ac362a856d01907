
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_PICK_H_INCLUDED_
#define _RATEPOOL_PICK_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


/* what the chooser needs to know of one key, gathered under the zone lock */

typedef struct {
    unsigned   usable:1;            /* not dead, not tried by this request */
    unsigned   home:1;              /* its org holds the request's cache */
    unsigned   cooling:1;           /* the provider refused it lately */
    uint64_t   free_at_ms;          /* cooldown end or refill, if later */
    uint32_t   headroom_permille;   /* org bucket level / capacity; 1000 if
                                       the limit is unknown */
    uint32_t   org_inflight;
    uint32_t   org_homes;           /* conversations it holds the cache of */
    uint32_t   key_inflight;
    uint64_t   last_pick_ms;
    uint32_t   fallback;            /* 0: preferred; higher: only when no
                                       lower one can be used now */
} ratepool_candidate_t;


/* headroom is compared in coarse steps so that load spreading decides ties */
#define RATEPOOL_HEADROOM_STEPS  16


long ratepool_pick(const ratepool_candidate_t *c, size_t n, uint64_t now_ms,
    uint64_t *soonest_ms);

/*
 * The same, for a request whose conversation has a home (the candidates
 * marked home): a home key that can be used now is chosen over any
 * other; if none can but one that is only short of room (not cooling
 * after a refusal) frees up within wait_home_ms, nothing is chosen and
 * *soonest_ms says when (the request waits for its home); else another
 * key, as for a first turn (the conversation moves).
 */
long ratepool_pick_home(const ratepool_candidate_t *c, size_t n,
    uint64_t now_ms, uint64_t wait_home_ms, uint64_t *soonest_ms);

/*
 * The same, for a conversation's first turn: among the keys that can be
 * used now, the org home to the fewest conversations first, as each will
 * come back for its next turns; headroom and the rest decide between
 * equals.
 */
long ratepool_pick_new(const ratepool_candidate_t *c, size_t n,
    uint64_t now_ms, uint64_t *soonest_ms);

uint64_t ratepool_cooldown_until(uint64_t current_until_ms, uint64_t now_ms,
    uint64_t floor_ms, uint32_t rnd);
uint64_t ratepool_backoff_ms(unsigned level);
unsigned ratepool_retry_after_sec(uint64_t wait_ms, uint32_t rnd);


#endif /* _RATEPOOL_PICK_H_INCLUDED_ */

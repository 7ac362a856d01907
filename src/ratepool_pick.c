
/*
 * Copyright (C) ratepool authors
 */


#include "ratepool_pick.h"


#define RATEPOOL_JITTER_MIN_MS     250
#define RATEPOOL_JITTER_MAX_MS     5000
#define RATEPOOL_BACKOFF_BASE_MS   2000
#define RATEPOOL_BACKOFF_MAX_MS    60000
#define RATEPOOL_RETRY_AFTER_MAX   60


typedef int (*ratepool_better_pt)(const ratepool_candidate_t *a,
    const ratepool_candidate_t *b);

static long ratepool_pick_by(const ratepool_candidate_t *c, size_t n,
    uint64_t now_ms, uint64_t *soonest_ms, ratepool_better_pt better);
static int ratepool_fewer_homes(const ratepool_candidate_t *a,
    const ratepool_candidate_t *b);
static int ratepool_better(const ratepool_candidate_t *a,
    const ratepool_candidate_t *b);


static int
ratepool_better(const ratepool_candidate_t *a, const ratepool_candidate_t *b)
{
    uint32_t  ha, hb;

    if (a->fallback != b->fallback) {
        return a->fallback < b->fallback;
    }

    ha = a->headroom_permille * RATEPOOL_HEADROOM_STEPS / 1001;
    hb = b->headroom_permille * RATEPOOL_HEADROOM_STEPS / 1001;

    if (ha != hb) {
        return ha > hb;
    }

    if (a->org_inflight != b->org_inflight) {
        return a->org_inflight < b->org_inflight;
    }

    if (a->key_inflight != b->key_inflight) {
        return a->key_inflight < b->key_inflight;
    }

    return a->last_pick_ms < b->last_pick_ms;
}


/*
 * Returns the index of the best key that can be used now, or -1.
 * With -1, *soonest_ms is the earliest moment a usable key frees up,
 * or 0 if no key is usable at all (every key dead or tried).
 */

long
ratepool_pick(const ratepool_candidate_t *c, size_t n, uint64_t now_ms,
    uint64_t *soonest_ms)
{
    return ratepool_pick_by(c, n, now_ms, soonest_ms, ratepool_better);
}


long
ratepool_pick_new(const ratepool_candidate_t *c, size_t n, uint64_t now_ms,
    uint64_t *soonest_ms)
{
    return ratepool_pick_by(c, n, now_ms, soonest_ms, ratepool_fewer_homes);
}


static long
ratepool_pick_by(const ratepool_candidate_t *c, size_t n, uint64_t now_ms,
    uint64_t *soonest_ms, ratepool_better_pt better)
{
    long    best;
    size_t  i;

    best = -1;
    *soonest_ms = 0;

    for (i = 0; i < n; i++) {

        if (!c[i].usable) {
            continue;
        }

        if (c[i].free_at_ms > now_ms) {
            if (*soonest_ms == 0 || c[i].free_at_ms < *soonest_ms) {
                *soonest_ms = c[i].free_at_ms;
            }

            continue;
        }

        if (best == -1 || better(&c[i], &c[best])) {
            best = (long) i;
        }
    }

    return best;
}


static int
ratepool_fewer_homes(const ratepool_candidate_t *a,
    const ratepool_candidate_t *b)
{
    if (a->fallback == b->fallback && a->org_homes != b->org_homes) {
        return a->org_homes < b->org_homes;
    }

    return ratepool_better(a, b);
}


long
ratepool_pick_home(const ratepool_candidate_t *c, size_t n, uint64_t now_ms,
    uint64_t wait_home_ms, uint64_t *soonest_ms)
{
    long      best;
    size_t    i;
    uint64_t  home_at_ms;

    best = -1;
    home_at_ms = 0;

    for (i = 0; i < n; i++) {

        if (!c[i].usable || !c[i].home) {
            continue;
        }

        if (c[i].free_at_ms > now_ms) {
            if (!c[i].cooling
                && (home_at_ms == 0 || c[i].free_at_ms < home_at_ms))
            {
                home_at_ms = c[i].free_at_ms;
            }

            continue;
        }

        if (best == -1 || ratepool_better(&c[i], &c[best])) {
            best = (long) i;
        }
    }

    if (best != -1) {
        *soonest_ms = 0;
        return best;
    }

    if (home_at_ms && home_at_ms - now_ms <= wait_home_ms) {
        *soonest_ms = home_at_ms;
        return -1;
    }

    /* a move is a new home: where the fewest conversations are */
    return ratepool_pick_new(c, n, now_ms, soonest_ms);
}


/*
 * retry-after is a floor: the org may be used again no earlier than
 * now + floor, plus a positive jitter so that several gateways (or
 * several keys of one org) do not all come back at the same instant.
 * A cooldown is only ever extended.
 */

uint64_t
ratepool_cooldown_until(uint64_t current_until_ms, uint64_t now_ms,
    uint64_t floor_ms, uint32_t rnd)
{
    uint64_t  span, until;

    span = floor_ms / 10;

    if (span < RATEPOOL_JITTER_MIN_MS) {
        span = RATEPOOL_JITTER_MIN_MS;
    }

    if (span > RATEPOOL_JITTER_MAX_MS) {
        span = RATEPOOL_JITTER_MAX_MS;
    }

    until = now_ms + floor_ms + 1 + rnd % span;

    return until > current_until_ms ? until : current_until_ms;
}


/* a 429 without retry-after: 2 s, doubling per repeat, at most a minute */

uint64_t
ratepool_backoff_ms(unsigned level)
{
    if (level >= 5) {
        return RATEPOOL_BACKOFF_MAX_MS;
    }

    return (uint64_t) RATEPOOL_BACKOFF_BASE_MS << level;
}


/*
 * The retry-after the gateway itself answers with: whole seconds, never
 * earlier than the wait, 1..60 because clients ignore anything above 60.
 */

unsigned
ratepool_retry_after_sec(uint64_t wait_ms, uint32_t rnd)
{
    uint64_t  span, sec;

    span = wait_ms / 10;

    if (span < RATEPOOL_JITTER_MIN_MS) {
        span = RATEPOOL_JITTER_MIN_MS;
    }

    wait_ms += rnd % span;

    sec = (wait_ms + 999) / 1000;

    if (sec < 1) {
        sec = 1;
    }

    if (sec > RATEPOOL_RETRY_AFTER_MAX) {
        sec = RATEPOOL_RETRY_AFTER_MAX;
    }

    return (unsigned) sec;
}


/*
 * Copyright (C) ratepool authors
 */


#include "ratepool_conversation.h"
#include "ratepool_home.h"


uint64_t
ratepool_home_key(uint64_t id, const unsigned char *model, size_t model_len)
{
    unsigned       i;
    uint64_t       h;
    unsigned char  b[8];

    for (i = 0; i < 8; i++) {
        b[i] = (unsigned char) (id >> (8 * i));
    }

    h = ratepool_hash_fnv(RATEPOOL_HASH_BASIS, b, sizeof(b));
    h = ratepool_hash_fnv(h, model, model_len);

    return ratepool_hash_mix(h);
}


int
ratepool_home_cost(const ratepool_turn_t *last, uint64_t bytes, int shared,
    uint64_t *full, uint64_t *home)
{
    if (last->bytes == 0 || last->total == 0) {
        return 0;
    }

    /* tokens per byte as this conversation's own text counts, rounded up */
    if (bytes > UINT64_MAX / last->total) {
        *full = UINT64_MAX / last->bytes;

    } else {
        *full = (bytes * last->total + last->bytes - 1) / last->bytes;
    }

    if (bytes < last->bytes && !shared) {
        /* rewritten: compacted, or another prompt under the same name */
        *home = *full;
        return 1;
    }

    *home = (*full > last->cached) ? *full - last->cached : 1;

    return 1;
}


uint64_t
ratepool_home_move_ms(uint64_t full, uint64_t home, uint64_t itpm)
{
    uint64_t  extra;

    if (itpm == 0) {
        return RATEPOOL_HOME_WAIT_MS;
    }

    extra = full > home ? full - home : 0;

    if (extra > UINT64_MAX / 60000) {
        return UINT64_MAX;
    }

    return extra * 60000 / itpm;
}

/*
 * libFuzzer target for the check of Redis replies: any bytes Redis (or
 * whatever answers in its place) sends are accepted or refused cleanly,
 * the same whole or split anywhere, and what is accepted keeps within
 * the bounds hiredis will then be trusted with.
 */

#include <stdint.h>
#include <stdlib.h>

#include "ratepool_resp.h"


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int                    whole, split;
    size_t                 at;
    ratepool_resp_check_t  a, b;

    ratepool_resp_check_init(&a);
    whole = ratepool_resp_check(&a, data, size);

    if (a.depth > RATEPOOL_RESP_DEPTH_MAX) {
        abort();
    }

    at = size ? data[0] % (size + 1) : 0;

    ratepool_resp_check_init(&b);
    (void) ratepool_resp_check(&b, data, at);
    split = ratepool_resp_check(&b, data + at, size - at);

    if (whole != split) {
        abort();
    }

    return 0;
}

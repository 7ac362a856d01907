/*
 * libFuzzer target for the header parsers: any bytes a provider (or a
 * man in the middle) sends must parse or fail cleanly, within bounds.
 */

#include <stdint.h>
#include <stdlib.h>

#include "ratepool_parse.h"
#include "ratepool_dialect.h"


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    time_t    t;
    uint64_t  v;

    (void) ratepool_parse_uint(data, size, &v);
    (void) ratepool_parse_http_date(data, size, &t);
    (void) ratepool_parse_rfc3339(data, size, &t);

    /* reads within what arrived, and a 2xx is never money spent */
    if (ratepool_error_spent(200, data, size)) {
        abort();
    }

    (void) ratepool_error_spent(429, data, size);

    if (ratepool_error_too_large(200, data, size)) {
        abort();
    }

    (void) ratepool_error_too_large(429, data, size);

    if (ratepool_parse_duration_ms(data, size, &v) == 0
        && v > 365ULL * 86400 * 1000)
    {
        abort();    /* durations are capped at a year */
    }

    if (ratepool_parse_retry_after(data, size, 1700000000, &v) == 0
        && v > 365ULL * 86400 * 1000)
    {
        abort();
    }

    return 0;
}

/*
 * libFuzzer target for Amazon's event stream and its conversion to SSE:
 * any bytes Bedrock (or whatever answers in its place) sends are read or
 * refused cleanly, the same whole or split anywhere, and every frame
 * converts within the room the converter is given.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ratepool_eventstream.h"


typedef struct {
    uint32_t  frames;
    uint32_t  crc;          /* of all the SSE written */
} fuzz_out_t;


static int
fuzz_frame(void *data, int kind, const unsigned char *type, size_t type_len,
    const unsigned char *payload, size_t len)
{
    long            n;
    fuzz_out_t     *o = data;
    unsigned char  *out;

    out = malloc(len + RATEPOOL_ES_SSE_EXTRA);
    if (out == NULL) {
        abort();
    }

    n = ratepool_es_sse(kind, type, type_len, payload, len, out,
                        len + RATEPOOL_ES_SSE_EXTRA);

    if (n > (long) (len + RATEPOOL_ES_SSE_EXTRA)) {
        abort();
    }

    o->frames++;

    if (n > 0) {
        o->crc = ratepool_crc32(o->crc, out, (size_t) n);
    }

    free(out);

    return n < 0 ? -1 : 0;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int                     whole, split;
    size_t                  at;
    fuzz_out_t              a, b;
    unsigned char           buf[65536];
    ratepool_eventstream_t  es;

    memset(&a, 0, sizeof(a));
    ratepool_es_init(&es, buf, sizeof(buf));
    whole = ratepool_es_feed(&es, data, size, fuzz_frame, &a);

    at = size ? data[0] % (size + 1) : 0;

    memset(&b, 0, sizeof(b));
    ratepool_es_init(&es, buf, sizeof(buf));
    split = ratepool_es_feed(&es, data, at, fuzz_frame, &b);

    if (split == 0) {
        split = ratepool_es_feed(&es, data + at, size - at, fuzz_frame, &b);
    }

    if (whole != split || a.frames != b.frames || a.crc != b.crc) {
        abort();
    }

    return 0;
}

/*
 * libFuzzer target for the usage scanner.  Besides "never crashes", it
 * checks the property the body filter relies on: however an answer is
 * cut into pieces, the scanner reads the same usage from it.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ratepool_usage.h"


static void
scan(ratepool_usage_t *u, int sse, const uint8_t *data, size_t size,
    size_t piece)
{
    size_t                    n;
    ratepool_usage_scanner_t  s;

    ratepool_usage_init(&s, sse);

    while (size) {
        n = (piece && piece < size) ? piece : size;
        ratepool_usage_feed(&s, data, n);
        data += n;
        size -= n;
    }

    ratepool_usage_finish(&s);
    *u = s.usage;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int               sse;
    size_t            piece;
    ratepool_usage_t  whole, split;

    if (size < 1) {
        return 0;
    }

    /* the first byte chooses the mode and the size of the pieces */
    sse = data[0] & 1;
    piece = (data[0] >> 1) + 1;
    data++;
    size--;

    scan(&whole, sse, data, size, 0);
    scan(&split, sse, data, size, piece);

    if (memcmp(&whole, &split, sizeof(ratepool_usage_t)) != 0) {
        abort();
    }

    /* byte by byte takes the slow path everywhere: the fast one agrees */
    scan(&split, sse, data, size, 1);

    if (memcmp(&whole, &split, sizeof(ratepool_usage_t)) != 0) {
        abort();
    }

    return 0;
}

/*
 * libFuzzer target for the request body scanner: whatever a client
 * sends, it reads the same model and output cap whole or in pieces, and
 * a model name never outgrows its buffer.  The first byte chooses the
 * piece size.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ratepool_request.h"


static void
scan(ratepool_request_t *rq, const uint8_t *data, size_t size, size_t piece)
{
    size_t  n;

    ratepool_request_init(rq);

    while (size) {
        n = (piece && piece < size) ? piece : size;
        ratepool_request_feed(rq, data, n);
        data += n;
        size -= n;
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t              piece;
    ratepool_request_t  whole, split;

    if (size < 1) {
        return 0;
    }

    piece = data[0] % 17;
    data++;
    size--;

    scan(&whole, data, size, 0);
    scan(&split, data, size, piece);

    if (whole.model_len > RATEPOOL_MODEL_MAX
        || whole.model_len != split.model_len
        || memcmp(whole.model, split.model, whole.model_len) != 0
        || whole.has_max_tokens != split.has_max_tokens
        || whole.max_tokens != split.max_tokens
        || whole.stream != split.stream)
    {
        abort();
    }

    (void) ratepool_model_match(data, size / 2, data + size / 2,
                                size - size / 2);

    return 0;
}

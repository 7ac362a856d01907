
/*
 * Copyright (C) ratepool authors
 */


#include <string.h>

#include "ratepool_dialect.h"
#include "ratepool_eventstream.h"


static uint32_t ratepool_es_u32(const unsigned char *p);
static int ratepool_es_frame(ratepool_eventstream_t *es,
    ratepool_es_handler_pt handler, void *data);
static long ratepool_es_base64(const unsigned char *in, size_t len,
    unsigned char *out);
static size_t ratepool_es_escape(const unsigned char *in, size_t len,
    unsigned char *out);
static const char *ratepool_es_error_type(const unsigned char *type,
    size_t len);


/* the CRC-32 of zlib and of Amazon's event stream, bit by bit */

uint32_t
ratepool_crc32(uint32_t crc, const unsigned char *p, size_t len)
{
    int  k;

    crc = ~crc;

    while (len--) {
        crc ^= *p++;

        for (k = 0; k < 8; k++) {
            crc = (crc >> 1) ^ (0xedb88320 & (0 - (crc & 1)));
        }
    }

    return ~crc;
}


static uint32_t
ratepool_es_u32(const unsigned char *p)
{
    return ((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16)
           | ((uint32_t) p[2] << 8) | p[3];
}


void
ratepool_es_init(ratepool_eventstream_t *es, unsigned char *buf, size_t cap)
{
    memset(es, 0, sizeof(ratepool_eventstream_t));

    es->buf = buf;
    es->cap = cap;
    es->need = RATEPOOL_ES_PRELUDE;
}


int
ratepool_es_feed(ratepool_eventstream_t *es, const unsigned char *p,
    size_t len, ratepool_es_handler_pt handler, void *data)
{
    size_t    n;
    uint32_t  total, headers;

    while (len && !es->broken) {
        n = es->need - es->have;

        if (n > len) {
            n = len;
        }

        memcpy(es->buf + es->have, p, n);
        es->have += n;
        p += n;
        len -= n;

        if (es->have < es->need) {
            break;
        }

        if (es->need == RATEPOOL_ES_PRELUDE) {
            total = ratepool_es_u32(es->buf);
            headers = ratepool_es_u32(es->buf + 4);

            if (ratepool_crc32(0, es->buf, 8) != ratepool_es_u32(es->buf + 8)
                || total < RATEPOOL_ES_PRELUDE + 4
                || total > es->cap || total > RATEPOOL_ES_FRAME_MAX
                || headers > total - RATEPOOL_ES_PRELUDE - 4)
            {
                es->broken = 1;
                break;
            }

            es->need = total;
            continue;
        }

        if (ratepool_es_frame(es, handler, data) != 0) {
            es->broken = 1;
            break;
        }

        es->have = 0;
        es->need = RATEPOOL_ES_PRELUDE;
    }

    return es->broken ? -1 : 0;
}


/* a whole frame: its CRC, its headers, then the handler */

static int
ratepool_es_frame(ratepool_eventstream_t *es, ratepool_es_handler_pt handler,
    void *data)
{
    int                   kind;
    size_t                total, skip, type_len;
    uint32_t              headers;
    unsigned char         name_len, value_type;
    const unsigned char  *p, *end, *name, *value, *type;

    total = es->need;
    headers = ratepool_es_u32(es->buf + 4);

    if (ratepool_crc32(0, es->buf, total - 4)
        != ratepool_es_u32(es->buf + total - 4))
    {
        return -1;
    }

    p = es->buf + RATEPOOL_ES_PRELUDE;
    end = p + headers;

    kind = 0;
    type = NULL;
    type_len = 0;

    while (p < end) {
        name_len = *p++;

        if ((size_t) (end - p) < (size_t) name_len + 1) {
            return -1;
        }

        name = p;
        p += name_len;
        value_type = *p++;

        /* only strings are read; the sizes of the others are known */

        switch (value_type) {
        case 0:             /* true */
        case 1:             /* false */
            skip = 0;
            break;
        case 2:
            skip = 1;
            break;
        case 3:
            skip = 2;
            break;
        case 4:
            skip = 4;
            break;
        case 5:
        case 8:             /* timestamp */
            skip = 8;
            break;
        case 9:             /* uuid */
            skip = 16;
            break;
        case 6:             /* bytes */
        case 7:             /* string */
            if (end - p < 2) {
                return -1;
            }

            skip = 2 + (((size_t) p[0] << 8) | p[1]);
            break;
        default:
            return -1;
        }

        if ((size_t) (end - p) < skip) {
            return -1;
        }

        if (value_type == 7) {
            value = p + 2;

            if (name_len == 13 && memcmp(name, ":message-type", 13) == 0) {
                if (skip - 2 == 5 && memcmp(value, "event", 5) == 0) {
                    kind = RATEPOOL_ES_EVENT;

                } else if (skip - 2 == 9
                           && memcmp(value, "exception", 9) == 0)
                {
                    kind = RATEPOOL_ES_EXCEPTION;
                }

            } else if ((name_len == 11
                        && memcmp(name, ":event-type", 11) == 0)
                       || (name_len == 15
                           && memcmp(name, ":exception-type", 15) == 0))
            {
                type = value;
                type_len = skip - 2;
            }
        }

        p += skip;
    }

    if (kind == 0 || type == NULL || type_len > RATEPOOL_ES_TYPE_MAX) {
        return -1;
    }

    return handler(data, kind, type, type_len, end,
                   total - RATEPOOL_ES_PRELUDE - headers - 4);
}


long
ratepool_es_sse(int kind, const unsigned char *type, size_t type_len,
    const unsigned char *payload, size_t len, unsigned char *out,
    size_t size)
{
    long                  n;
    size_t                head, msg_len;
    const char           *error;
    unsigned char         msg[128], *json, *o;
    const unsigned char  *from, *to, *t, *t_end;

    static const char  start[] = "event: ";
    static const char  data[] = "\ndata: ";
    static const char  error_start[] =
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"";
    static const char  error_message[] = "\",\"message\":\"";
    static const char  error_end[] = "\"}}\n\n";

    if (size < len + RATEPOOL_ES_SSE_EXTRA) {
        return -1;
    }

    if (kind == RATEPOOL_ES_EXCEPTION) {
        /* at most 6 bytes escaped for each of the message's 128 */
        msg_len = ratepool_error_message(payload, len, msg, sizeof(msg));
        error = ratepool_es_error_type(type, type_len);

        o = out;
        memcpy(o, error_start, sizeof(error_start) - 1);
        o += sizeof(error_start) - 1;
        memcpy(o, error, strlen(error));
        o += strlen(error);
        memcpy(o, error_message, sizeof(error_message) - 1);
        o += sizeof(error_message) - 1;
        o += ratepool_es_escape(msg, msg_len, o);
        memcpy(o, error_end, sizeof(error_end) - 1);
        o += sizeof(error_end) - 1;

        return (long) (o - out);
    }

    if (type_len != 5 || memcmp(type, "chunk", 5) != 0) {
        return 0;
    }

    if (!ratepool_json_top_string(payload, len, "bytes", 5, &from, &to)) {
        return -1;
    }

    /* decoded after room for the event line, which needs its type */

    json = out + sizeof(start) + RATEPOOL_ES_TYPE_MAX + sizeof(data);

    n = ratepool_es_base64(from, to - from, json);

    if (n <= 0
        || !ratepool_json_top_string(json, (size_t) n, "type", 4, &t, &t_end)
        || t_end - t > RATEPOOL_ES_TYPE_MAX
        || memchr(t, '\\', t_end - t) != NULL)
    {
        return -1;
    }

    head = 0;
    memcpy(out, start, sizeof(start) - 1);
    head += sizeof(start) - 1;
    memmove(out + head, t, t_end - t);
    head += t_end - t;
    memcpy(out + head, data, sizeof(data) - 1);
    head += sizeof(data) - 1;

    memmove(out + head, json, (size_t) n);
    memcpy(out + head + n, "\n\n", 2);

    return (long) head + n + 2;
}


static long
ratepool_es_base64(const unsigned char *in, size_t len, unsigned char *out)
{
    int       v;
    size_t    i, n;
    uint32_t  acc;
    unsigned  bits;

    acc = 0;
    bits = 0;
    n = 0;

    for (i = 0; i < len; i++) {
        if (in[i] >= 'A' && in[i] <= 'Z') {
            v = in[i] - 'A';

        } else if (in[i] >= 'a' && in[i] <= 'z') {
            v = in[i] - 'a' + 26;

        } else if (in[i] >= '0' && in[i] <= '9') {
            v = in[i] - '0' + 52;

        } else if (in[i] == '+') {
            v = 62;

        } else if (in[i] == '/') {
            v = 63;

        } else if (in[i] == '=') {
            break;

        } else {
            return -1;
        }

        acc = (acc << 6) | (uint32_t) v;
        bits += 6;

        if (bits >= 8) {
            bits -= 8;
            out[n++] = (unsigned char) (acc >> bits);
        }
    }

    return (long) n;
}


static size_t
ratepool_es_escape(const unsigned char *in, size_t len, unsigned char *out)
{
    size_t  i, n;

    static const char  hex[] = "0123456789abcdef";

    n = 0;

    for (i = 0; i < len; i++) {
        if (in[i] == '"' || in[i] == '\\') {
            out[n++] = '\\';
            out[n++] = in[i];

        } else if (in[i] < 0x20) {
            memcpy(out + n, "\\u00", 4);
            out[n + 4] = hex[in[i] >> 4];
            out[n + 5] = hex[in[i] & 0xf];
            n += 6;

        } else {
            out[n++] = in[i];
        }
    }

    return n;
}


/* Bedrock's stream exceptions, as Anthropic's error types */

static const char *
ratepool_es_error_type(const unsigned char *type, size_t len)
{
    static const struct {
        const char  *exception;
        const char  *type;
    } map[] = {
        { "throttlingException", "rate_limit_error" },
        { "serviceUnavailableException", "overloaded_error" },
        { "validationException", "invalid_request_error" },
        { "modelTimeoutException", "timeout_error" },
        { NULL, "api_error" }
    };

    size_t  i;

    for (i = 0; map[i].exception; i++) {
        if (strlen(map[i].exception) == len
            && memcmp(map[i].exception, type, len) == 0)
        {
            break;
        }
    }

    return map[i].type;
}

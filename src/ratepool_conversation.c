
/*
 * Copyright (C) ratepool authors
 */


#include <string.h>

#include "ratepool_conversation.h"


/* JSON states inside a value */
#define CV_VALUE            0   /* a value is due */
#define CV_VALUE_OR_END     1   /* after "[" */
#define CV_KEY_OR_END       2   /* after "{" */
#define CV_KEY              3   /* after "," in an object */
#define CV_KEY_STRING       4
#define CV_COLON            5
#define CV_STRING           6
#define CV_BARE             7   /* a number, true, false or null */
#define CV_AFTER_VALUE      8
#define CV_LAX              9   /* malformed or too deep: only its end
                                   is looked for, as the request scanner
                                   would */

/* keys that matter; everything else is CV_KEY_OTHER */
#define CV_KEY_OTHER        0
#define CV_KEY_CACHE        1   /* "cache_control", at any depth */
#define CV_KEY_ROLE         2   /* a message's own "role" */
#define CV_KEY_TTL          3   /* a cache_control's own "ttl" */

/* roles of messages */
#define CV_ROLE_OTHER       0
#define CV_ROLE_USER        1
#define CV_ROLE_SYSTEM      2   /* "system" or "developer" */

/* FNV-1a, 64 bits, from RATEPOOL_HASH_BASIS */
#define CV_FNV_PRIME        0x00000100000001b3ULL


static uint64_t ratepool_conv_add(uint64_t h, uint64_t x);
static int ratepool_conv_text(ratepool_conversation_t *cv, const char *s);
static void ratepool_conv_byte(ratepool_conversation_t *cv, unsigned char c);
static void ratepool_conv_hash(ratepool_conversation_t *cv, unsigned char c);
static void ratepool_conv_lax(ratepool_conversation_t *cv, unsigned char c);
static void ratepool_conv_open(ratepool_conversation_t *cv, unsigned char c);
static void ratepool_conv_close(ratepool_conversation_t *cv,
    unsigned char c);
static void ratepool_conv_key_byte(ratepool_conversation_t *cv,
    unsigned char c);
static void ratepool_conv_key_end(ratepool_conversation_t *cv);
static void ratepool_conv_value_start(ratepool_conversation_t *cv,
    unsigned char c);
static void ratepool_conv_value_end(ratepool_conversation_t *cv);
static void ratepool_conv_message_end(ratepool_conversation_t *cv);


void
ratepool_conversation_init(ratepool_conversation_t *cv)
{
    memset(cv, 0, sizeof(ratepool_conversation_t));
}


int
ratepool_conversation_value(ratepool_conversation_t *cv, unsigned which,
    uint64_t at, unsigned char c)
{
    unsigned  bit;

    bit = 1u << which;

    if (which == RATEPOOL_CONV_CACHE) {
        cv->cache_control = 1;

    } else {
        if (cv->seen & bit) {
            cv->bad = 1;        /* which of the two would the API read? */
        }

        cv->seen |= bit;
    }

    if (c != '{' && c != '[' && c != '"') {

        /* "tools": null is as good as no tools; other literals are wrong */

        if (which == RATEPOOL_CONV_MESSAGES
            || (which != RATEPOOL_CONV_CACHE && c != 'n'))
        {
            cv->bad = 1;
        }

        return 0;
    }

    if (which == RATEPOOL_CONV_MESSAGES) {
        if (c != '[') {
            cv->bad = 1;
        }

        cv->leading = 1;
        cv->leading_n = 0;
        cv->leading_hash = RATEPOOL_HASH_BASIS;
        cv->found_user = 0;
        cv->first_hash = 0;
    }

    cv->in_value = 1;
    cv->which = which;
    cv->state = CV_VALUE;
    cv->depth = 0;
    cv->cc_depth = (which == RATEPOOL_CONV_CACHE) ? 1 : 0;
    cv->hashing = (which == RATEPOOL_CONV_TOOLS
                   || which == RATEPOOL_CONV_SYSTEM);
    cv->hash = RATEPOOL_HASH_BASIS;
    cv->escape = 0;
    cv->key = CV_KEY_OTHER;
    cv->capture = CV_KEY_OTHER;
    cv->pos = at;

    return 1;
}


size_t
ratepool_conversation_feed(ratepool_conversation_t *cv,
    const unsigned char *p, size_t len)
{
    unsigned              prefix;
    const unsigned char  *start, *end, *q;

    start = p;
    end = p + len;
    prefix = cv->in_value && (cv->which == RATEPOOL_CONV_TOOLS
                              || cv->which == RATEPOOL_CONV_SYSTEM);

    while (p < end && cv->in_value) {

        /* the bulk of a body is text: hash it or run through it */

        if (cv->state == CV_STRING && !cv->escape && !cv->capture) {
            for (q = p; q < end && *q != '"' && *q != '\\'; q++) {
                /* void */
            }

            if (cv->hashing && cv->cc_depth == 0) {
                cv->hash = ratepool_hash_fnv(cv->hash, p, q - p);
            }

            cv->pos += q - p;
            p = q;

            if (p == end) {
                break;
            }

        } else if (cv->state == CV_LAX && !cv->escape) {
            if (cv->lax_string) {
                for (q = p; q < end && *q != '"' && *q != '\\'; q++) {
                    /* void */
                }

            } else {
                for (q = p;
                     q < end && *q != '"' && *q != '{' && *q != '['
                     && *q != '}' && *q != ']';
                     q++)
                {
                    /* void */
                }
            }

            cv->pos += q - p;
            p = q;

            if (p == end) {
                break;
            }
        }

        ratepool_conv_byte(cv, *p++);
        cv->pos++;
    }

    if (prefix) {
        cv->prefix_bytes += p - start;
    }

    return p - start;
}


void
ratepool_conversation_finish(ratepool_conversation_t *cv)
{
    uint64_t  h, leading;

    cv->valid = !cv->bad && !cv->in_value
                && (cv->seen & (1u << RATEPOOL_CONV_MESSAGES))
                && cv->found_user;

    if (!cv->valid) {
        cv->prefix_hash = 0;
        cv->conversation_hash = 0;
        cv->prefix_bytes = 0;
        cv->has_prefix = 0;
        cv->last_message_at = 0;
        return;
    }

    leading = cv->leading_n ? ratepool_hash_mix(cv->leading_hash) : 0;

    /* the parts in the order a provider's cache reads them */

    h = ratepool_conv_add(RATEPOOL_HASH_BASIS, cv->tools_hash);
    h = ratepool_conv_add(h, cv->system_hash);
    h = ratepool_conv_add(h, leading);

    cv->prefix_hash = ratepool_hash_mix(h);
    cv->has_prefix = (cv->tools_hash || cv->system_hash || leading);

    h = ratepool_conv_add(h, cv->first_hash);
    cv->conversation_hash = ratepool_hash_mix(h);
}


uint64_t
ratepool_hash_fnv(uint64_t h, const unsigned char *p, size_t len)
{
    while (len--) {
        h ^= *p++;
        h *= CV_FNV_PRIME;
    }

    return h;
}


/* one part's hash into a running one, its 8 bytes as FNV-1a reads them */

static uint64_t
ratepool_conv_add(uint64_t h, uint64_t x)
{
    unsigned  i;

    for (i = 0; i < 8; i++) {
        h ^= x & 0xff;
        h *= CV_FNV_PRIME;
        x >>= 8;
    }

    return h;
}


/*
 * FNV-1a alone mixes its last bytes poorly into the high bits; a
 * finalizer of xor-shifts and odd multipliers (the constants of
 * SplitMix64's) makes every input bit reach every output bit.  Never
 * 0: that means "no hash".
 */

uint64_t
ratepool_hash_mix(uint64_t h)
{
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;

    return h ? h : 1;
}


static int
ratepool_conv_text(ratepool_conversation_t *cv, const char *s)
{
    return !cv->text_bad && strlen(s) == cv->text_len
           && memcmp(s, cv->text, cv->text_len) == 0;
}


static void
ratepool_conv_hash(ratepool_conversation_t *cv, unsigned char c)
{
    if (cv->hashing && cv->cc_depth == 0) {
        cv->hash = (cv->hash ^ c) * CV_FNV_PRIME;
    }
}


static void
ratepool_conv_byte(ratepool_conversation_t *cv, unsigned char c)
{
    switch (cv->state) {

    case CV_VALUE_OR_END:
        if (c == ']') {
            ratepool_conv_close(cv, c);
            return;
        }

        /* fall through */

    case CV_VALUE:
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            return;
        }

        ratepool_conv_value_start(cv, c);

        if (c == '"') {
            ratepool_conv_hash(cv, c);
            cv->state = CV_STRING;
            cv->escape = 0;

        } else if (c == '{' || c == '[') {
            ratepool_conv_open(cv, c);

        } else if ((c >= '0' && c <= '9') || c == '-'
                   || c == 't' || c == 'f' || c == 'n')
        {
            ratepool_conv_hash(cv, c);
            cv->state = CV_BARE;

        } else {
            ratepool_conv_lax(cv, c);
        }

        return;

    case CV_KEY_OR_END:
        if (c == '}') {
            ratepool_conv_close(cv, c);
            return;
        }

        /* fall through */

    case CV_KEY:
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            return;
        }

        if (c != '"') {
            ratepool_conv_lax(cv, c);
            return;
        }

        /* the key is hashed when it is known not to be cache_control */

        cv->state = CV_KEY_STRING;
        cv->escape = 0;
        cv->key_long = 0;
        cv->text_len = 0;
        cv->text_bad = 0;
        return;

    case CV_KEY_STRING:
        if (cv->escape) {
            cv->escape = 0;

        } else if (c == '\\') {
            cv->escape = 1;

        } else if (c == '"') {
            ratepool_conv_key_end(cv);
            return;
        }

        ratepool_conv_key_byte(cv, c);
        return;

    case CV_COLON:
        if (c == ':') {
            ratepool_conv_hash(cv, c);
            cv->state = CV_VALUE;

        } else if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            ratepool_conv_lax(cv, c);
        }

        return;

    case CV_STRING:
        ratepool_conv_hash(cv, c);

        if (cv->escape) {
            cv->escape = 0;
            cv->text_bad = 1;

        } else if (c == '\\') {
            cv->escape = 1;
            cv->text_bad = 1;

        } else if (c == '"') {
            cv->state = CV_AFTER_VALUE;
            ratepool_conv_value_end(cv);

        } else if (cv->text_len < sizeof(cv->text)) {
            cv->text[cv->text_len++] = c;

        } else {
            cv->text_bad = 1;
        }

        return;

    case CV_BARE:
        if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z')
            || (c >= 'A' && c <= 'Z') || c == '.' || c == '+' || c == '-')
        {
            ratepool_conv_hash(cv, c);
            return;
        }

        cv->state = CV_AFTER_VALUE;
        ratepool_conv_value_end(cv);
        ratepool_conv_byte(cv, c);
        return;

    case CV_AFTER_VALUE:
        if (c == ',') {
            if (cv->objects & (1ULL << (cv->depth - 1))) {

                /* not hashed: a member left out leaves no trace */

                cv->state = CV_KEY;

            } else {
                ratepool_conv_hash(cv, c);
                cv->state = CV_VALUE;
            }

        } else if (c == '}' || c == ']') {
            ratepool_conv_close(cv, c);

        } else if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            ratepool_conv_lax(cv, c);
        }

        return;

    case CV_LAX:
        if (cv->lax_string) {
            if (cv->escape) {
                cv->escape = 0;

            } else if (c == '\\') {
                cv->escape = 1;

            } else if (c == '"') {
                cv->lax_string = 0;
            }

            return;
        }

        if (c == '"') {
            cv->lax_string = 1;

        } else if (c == '{' || c == '[') {
            cv->depth++;

        } else if ((c == '}' || c == ']') && --cv->depth == 0) {
            cv->in_value = 0;
        }

        return;
    }
}


/*
 * From here on the value is only skipped to its end, counting brackets
 * outside strings as the request scanner does for values it skips, so
 * that the two agree where it ends; the byte that did not fit is the
 * first one counted.
 */

static void
ratepool_conv_lax(ratepool_conversation_t *cv, unsigned char c)
{
    cv->bad = 1;
    cv->state = CV_LAX;
    cv->lax_string = 0;
    cv->escape = 0;

    ratepool_conv_byte(cv, c);
}


static void
ratepool_conv_open(ratepool_conversation_t *cv, unsigned char c)
{
    if (cv->depth == RATEPOOL_CONV_DEPTH) {
        ratepool_conv_lax(cv, c);
        return;
    }

    ratepool_conv_hash(cv, c);

    if (c == '{') {
        cv->objects |= 1ULL << cv->depth;
        cv->state = CV_KEY_OR_END;

    } else {
        cv->objects &= ~(1ULL << cv->depth);
        cv->state = CV_VALUE_OR_END;
    }

    cv->depth++;
}


static void
ratepool_conv_close(ratepool_conversation_t *cv, unsigned char c)
{
    unsigned  object;

    object = (cv->objects >> (cv->depth - 1)) & 1;

    if (object != (c == '}')) {
        ratepool_conv_lax(cv, c);
        return;
    }

    ratepool_conv_hash(cv, c);
    cv->depth--;
    cv->state = CV_AFTER_VALUE;

    ratepool_conv_value_end(cv);
}


static void
ratepool_conv_key_byte(ratepool_conversation_t *cv, unsigned char c)
{
    if (cv->key_long) {
        ratepool_conv_hash(cv, c);
        return;
    }

    if (cv->text_len < sizeof(cv->text)) {
        cv->text[cv->text_len++] = c;
        return;
    }

    /* too long to be one of ours: what was held back is hashed now */

    cv->key_long = 1;

    if (cv->hashing && cv->cc_depth == 0) {
        cv->hash = ratepool_hash_fnv(cv->hash, (const unsigned char *) "\"",
                                     1);
        cv->hash = ratepool_hash_fnv(cv->hash, cv->text, cv->text_len);
    }

    ratepool_conv_hash(cv, c);
}


static void
ratepool_conv_key_end(ratepool_conversation_t *cv)
{
    cv->state = CV_COLON;
    cv->key = CV_KEY_OTHER;

    if (cv->key_long) {
        ratepool_conv_hash(cv, '"');
        return;
    }

    /* keys are compared as written: an escaped one is none of ours */

    if (ratepool_conv_text(cv, "cache_control")) {
        cv->key = CV_KEY_CACHE;
        cv->cache_control = 1;

        /* the member is left out of the hash, up to its value's end */

        if (cv->cc_depth == 0) {
            cv->cc_depth = cv->depth + 1;
        }

    } else if (cv->which == RATEPOOL_CONV_MESSAGES && cv->depth == 2
               && ratepool_conv_text(cv, "role"))
    {
        cv->key = CV_KEY_ROLE;

    } else if (cv->cc_depth && cv->depth == cv->cc_depth
               && ratepool_conv_text(cv, "ttl"))
    {
        cv->key = CV_KEY_TTL;
    }

    if (cv->hashing && cv->cc_depth == 0) {
        cv->hash = ratepool_hash_fnv(cv->hash, (const unsigned char *) "\"",
                                     1);
        cv->hash = ratepool_hash_fnv(cv->hash, cv->text, cv->text_len);
        cv->hash = ratepool_hash_fnv(cv->hash, (const unsigned char *) "\"",
                                     1);
    }
}


/* c begins a value at cv->depth; cv->pos is its offset in the body */

static void
ratepool_conv_value_start(ratepool_conversation_t *cv, unsigned char c)
{
    if (cv->which == RATEPOOL_CONV_MESSAGES && cv->depth == 1) {
        cv->last_message_at = cv->pos;
        cv->role = CV_ROLE_OTHER;
        cv->hash = RATEPOOL_HASH_BASIS;

        /* once the first user message is known, the rest is only read */

        cv->hashing = !cv->found_user;
    }

    cv->capture = (c == '"') ? cv->key : CV_KEY_OTHER;
    cv->key = CV_KEY_OTHER;
    cv->text_len = 0;
    cv->text_bad = 0;
}


/* a value has ended: cv->depth is again that of its container */

static void
ratepool_conv_value_end(ratepool_conversation_t *cv)
{
    if (cv->capture == CV_KEY_ROLE) {
        if (ratepool_conv_text(cv, "user")) {
            cv->role = CV_ROLE_USER;

        } else if (ratepool_conv_text(cv, "system")
                   || ratepool_conv_text(cv, "developer"))
        {
            cv->role = CV_ROLE_SYSTEM;
        }

    } else if (cv->capture == CV_KEY_TTL && ratepool_conv_text(cv, "1h")) {
        cv->ttl_1h = 1;
    }

    cv->capture = CV_KEY_OTHER;

    if (cv->cc_depth && cv->depth + 1 == cv->cc_depth) {
        cv->cc_depth = 0;
    }

    if (cv->depth == 1 && cv->which == RATEPOOL_CONV_MESSAGES) {
        ratepool_conv_message_end(cv);
        return;
    }

    if (cv->depth > 0) {
        return;
    }

    cv->in_value = 0;

    if (cv->which == RATEPOOL_CONV_TOOLS) {
        cv->tools_hash = ratepool_hash_mix(cv->hash);

    } else if (cv->which == RATEPOOL_CONV_SYSTEM) {
        cv->system_hash = ratepool_hash_mix(cv->hash);
    }
}


/*
 * Every message up to the first user message is hashed, as its role may
 * come after its content; what it was is decided at its end.
 */

static void
ratepool_conv_message_end(ratepool_conversation_t *cv)
{
    uint64_t  h;

    if (!cv->hashing) {
        return;
    }

    cv->hashing = 0;
    h = ratepool_hash_mix(cv->hash);

    if (cv->leading && cv->role == CV_ROLE_SYSTEM) {
        cv->leading_hash = ratepool_conv_add(cv->leading_hash, h);
        cv->leading_n++;
        return;
    }

    cv->leading = 0;

    if (cv->role == CV_ROLE_USER) {
        cv->first_hash = h;
        cv->found_user = 1;
    }
}

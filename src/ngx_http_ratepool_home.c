
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_home.h"


/*
 * Where each conversation's prompt cache lives: an rbtree of homes in
 * the zone, keyed by the conversation's key, with a queue from the most
 * to the least recently used, as limit_req keeps its nodes.  A home
 * lives as long as the provider keeps the cache (each turn renews it);
 * when the zone is full the least recently used homes are given up.
 * The tree uses nginx's own insert function, so that a reload with
 * another build of the module finds it working.
 */


static ngx_http_ratepool_home_t *ngx_http_ratepool_home_get(
    ngx_http_ratepool_zone_t *zone, uint64_t id, ngx_uint_t prefix,
    uint64_t now_ms);
static void ngx_http_ratepool_home_free(ngx_http_ratepool_zone_t *zone,
    ngx_http_ratepool_home_t *home);
static void ngx_http_ratepool_home_expire(ngx_http_ratepool_zone_t *zone,
    ngx_uint_t n, uint64_t now_ms);


void
ngx_http_ratepool_home_init(ngx_http_ratepool_shctx_t *sh)
{
    ngx_rbtree_init(&sh->homes, &sh->homes_sentinel, ngx_rbtree_insert_value);
    ngx_queue_init(&sh->homes_lru);
}


ngx_http_ratepool_home_t *
ngx_http_ratepool_home_find(ngx_http_ratepool_zone_t *zone, uint64_t id,
    uint64_t now_ms)
{
    ngx_rbtree_key_t           key;
    ngx_rbtree_node_t         *node, *sentinel;
    ngx_http_ratepool_home_t  *home;

    key = (ngx_rbtree_key_t) id;
    node = zone->sh->homes.root;
    sentinel = zone->sh->homes.sentinel;

    while (node != sentinel) {

        if (key != node->key) {
            node = (key < node->key) ? node->left : node->right;
            continue;
        }

        home = (ngx_http_ratepool_home_t *) node;

        if (home->id != id) {
            /* the same low bits, where keys are narrower than ids */
            node = node->right;
            continue;
        }

        if (home->until_ms <= now_ms) {
            /* the provider has let the cache go */
            ngx_http_ratepool_home_free(zone, home);
            return NULL;
        }

        return home;
    }

    return NULL;
}


void
ngx_http_ratepool_home_set(ngx_http_ratepool_zone_t *zone, uint64_t id,
    ngx_http_ratepool_org_sh_t *org, uint64_t ttl_ms, ratepool_turn_t *turn,
    uint64_t now_ms)
{
    ngx_http_ratepool_home_t  *home;

    home = ngx_http_ratepool_home_get(zone, id, 0, now_ms);
    if (home == NULL) {
        return;
    }

    if (home->org != org) {
        if (home->org && home->org->homes) {
            home->org->homes--;
        }

        /* the new org's cache lives as long as this turn made it */
        org->homes++;
        home->org = org;
        home->until_ms = 0;
    }

    /* a 1-hour breakpoint keeps the cache that long, a later 5-minute
       one does not shorten it */
    home->until_ms = ngx_max(home->until_ms, now_ms + ttl_ms);
    home->last = *turn;
}


/*
 * What Redis says of a conversation's home, unless this gateway has seen
 * a later turn of it (its cache renewed later than Redis's): a write that
 * did not reach Redis must not send the conversation back.
 */

void
ngx_http_ratepool_home_learn(ngx_http_ratepool_zone_t *zone, uint64_t id,
    ngx_http_ratepool_org_sh_t *org, uint64_t ttl_ms, ratepool_turn_t *turn,
    uint64_t now_ms)
{
    ngx_http_ratepool_home_t  *home;

    home = ngx_http_ratepool_home_find(zone, id, now_ms);

    if (home && home->org != org && home->until_ms > now_ms + ttl_ms) {
        return;
    }

    ngx_http_ratepool_home_set(zone, id, org, ttl_ms, turn, now_ms);
}


void
ngx_http_ratepool_home_prefix(ngx_http_ratepool_zone_t *zone, uint64_t id,
    ngx_http_ratepool_org_sh_t *org, uint64_t ttl_ms, uint64_t now_ms)
{
    ngx_http_ratepool_home_t  *home;

    home = ngx_http_ratepool_home_get(zone, id, 1, now_ms);
    if (home == NULL) {
        return;
    }

    home->org = org;
    home->until_ms = ngx_max(home->until_ms, now_ms + ttl_ms);
}


/* a home found, or made (the least recently used giving way) */

static ngx_http_ratepool_home_t *
ngx_http_ratepool_home_get(ngx_http_ratepool_zone_t *zone, uint64_t id,
    ngx_uint_t prefix, uint64_t now_ms)
{
    ngx_http_ratepool_home_t  *home;

    ngx_http_ratepool_home_expire(zone, 2, now_ms);

    home = ngx_http_ratepool_home_find(zone, id, now_ms);

    if (home) {
        ngx_queue_remove(&home->lru);
        ngx_queue_insert_head(&zone->sh->homes_lru, &home->lru);
        return home;
    }

    home = ngx_slab_calloc_locked(zone->shpool,
                                  sizeof(ngx_http_ratepool_home_t));

    if (home == NULL) {
        /* full: the least recently used give way */
        ngx_http_ratepool_home_expire(zone, 0, now_ms);

        home = ngx_slab_calloc_locked(zone->shpool,
                                      sizeof(ngx_http_ratepool_home_t));
        if (home == NULL) {
            return NULL;
        }
    }

    home->id = id;
    home->node.key = (ngx_rbtree_key_t) id;
    home->prefix = prefix;

    ngx_rbtree_insert(&zone->sh->homes, &home->node);
    ngx_queue_insert_head(&zone->sh->homes_lru, &home->lru);
    zone->sh->nhomes++;

    if (!prefix) {
        zone->sh->conversations++;
    }

    return home;
}


/*
 * Gives up expired homes from the least recently used end, at most n
 * of them; n = 0: three of the least recently used ones, live or not, to
 * make room.
 */

static void
ngx_http_ratepool_home_expire(ngx_http_ratepool_zone_t *zone, ngx_uint_t n,
    uint64_t now_ms)
{
    ngx_uint_t                 i, freed;
    ngx_queue_t               *q, *prev;
    ngx_http_ratepool_home_t  *home;

    /*
     * The queue is in the order of last use, not of expiry (a 1-hour
     * cache may have been used before a 5-minute one): a few from the
     * tail are looked at, and the expired among them given up.
     */

    freed = 0;
    q = ngx_queue_last(&zone->sh->homes_lru);

    for (i = 0; i < 8 && q != ngx_queue_sentinel(&zone->sh->homes_lru); i++) {
        prev = ngx_queue_prev(q);
        home = ngx_queue_data(q, ngx_http_ratepool_home_t, lru);

        if (home->until_ms <= now_ms || (n == 0 && freed < 3)) {

            if (home->until_ms > now_ms && !home->prefix) {
                zone->sh->homes_evicted++;
            }

            ngx_http_ratepool_home_free(zone, home);

            if (++freed == (n ? n : 3)) {
                return;
            }
        }

        q = prev;
    }
}


static void
ngx_http_ratepool_home_free(ngx_http_ratepool_zone_t *zone,
    ngx_http_ratepool_home_t *home)
{
    if (!home->prefix) {
        if (home->org && home->org->homes) {
            home->org->homes--;
        }

        zone->sh->conversations--;
    }

    ngx_queue_remove(&home->lru);
    ngx_rbtree_delete(&zone->sh->homes, &home->node);
    zone->sh->nhomes--;

    ngx_slab_free_locked(zone->shpool, home);
}

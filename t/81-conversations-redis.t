#!/usr/bin/perl

# A fleet of gateways on one Redis sends a conversation's turns to one
# org, whichever gateway each turn goes through: the org that answered a
# turn is written to Redis, and a gateway asks before it places a turn.
# Real redis-server, real nginx, the mock's prompt caches.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;

use Ratepool::Conversation;
use Ratepool::Test;

my $a = Ratepool::Test->new;
my $b = Ratepool::Test->new;

my $redis = $a->start_redis;

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(4) }
          qw(a1 b1 c1);
my $TOKEN = 'gw-fleet-' . Ratepool::Test::random_hex(4);

my $mock = $a->start_mock(port => 1, log => 1, config => {
    keys => { map { ($KEY{$_} => { org => "org-" . substr($_, 0, 1),
                                   name => $_ }) } keys %KEY },
    prompt_cache => JSON::PP::true,
    log_body => JSON::PP::false,
});

sub config {
    my ($t) = @_;
    my $port = $mock->port;

    return <<"EOF";
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis=127.0.0.1:${\ $redis->port }
                  redis_timeout=200ms;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-a rpm=1000 itpm=1000000 otpm=100000;
        ratepool_org org-b rpm=1000 itpm=1000000 otpm=100000;
        ratepool_org org-c rpm=1000 itpm=1000000 otpm=100000;
        ratepool_key a1 org=org-a server=127.0.0.1:$port key=$KEY{a1};
        ratepool_key b1 org=org-b server=127.0.0.1:$port key=$KEY{b1};
        ratepool_key c1 org=org-c server=127.0.0.1:$port key=$KEY{c1};
    }

    ratepool_workspace team;
    ratepool_client team ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF
}

$a->write_config(config($a));
$b->write_config(config($b));
$a->run;
$b->run;

ok(Ratepool::Test::redis_connected($a, $b), 'both gateways connect to Redis');

# the first gateway has just used two orgs, so that it places a new
# conversation on the third, where the second would not on its own

is($a->messages(token => $TOKEN)->{status}, 200, 'a request on one gateway');
is($a->messages(token => $TOKEN)->{status}, 200, 'and another');

my $from = @{ $mock->log };

for my $c (Ratepool::Conversation->new('cc', session => 'fleet-session'),
           Ratepool::Conversation->new('sdk'))
{
    my @got = map { $c->turn($_ % 2 ? $b : $a, token => $TOKEN)->{status} }
              0 .. 5;
    is_deeply(\@got, [ (200) x 6 ],
              'six turns of a conversation, through both gateways in turn');

    my @log = @{ $mock->log };
    my @orgs = map { $_->{org} } @log[$from .. $#log];
    is(scalar(keys %{ { map { $_ => 1 } @orgs } }), 1,
       'went to one org, whichever gateway sent them')
        or diag explain \@orgs;
    is(scalar(grep { ($_->{usage}{cache_read_input_tokens} // 0) > 0 }
              @log[$from + 1 .. $#log]), 5,
       'so that every turn after the first read its cache');

    $from = @log;
}

# no secret, token or session id is a Redis key's name

my @keys = split /\n/, $redis->cli('--scan', '--pattern', '*');
my @homes = grep { /:c:[0-9a-f]{16}$/ } @keys;
cmp_ok(scalar @homes, '>=', 2, 'Redis keeps the conversations\' homes')
    or diag explain \@keys;
is(scalar(grep { /fleet-session|sk-ant|gw-fleet/ } @keys), 0,
   'under names that tell nothing of the conversation');

$a->stop;
$b->stop;
$a->check_log;
$b->check_log;

done_testing;

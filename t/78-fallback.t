#!/usr/bin/perl

# Overload is the provider's, not the key's: a 529 moves the request to
# another provider of the same dialect (a key with a higher fallback=),
# cools no org, and gives that provider's server a moment; the fallback
# provider also takes requests while every preferred key is cooling.
# A request never moves to a key of another dialect.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep);

use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => "sk-ant-mock-$_-" . int(rand(1e9)) }
          qw(a1 b1 o1 a2 b2 a3 b3);
my $TOKEN = 'gw-fallback-' . int(rand(1e9));

my $direct = $t->start_mock(port => 1, log => 1);
my $other = $t->start_mock(port => 2, log => 1);

$t->write_config(<<"EOF2");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_key a1 org=oa server=127.0.0.1:%%PORT_1%% key=$KEY{a1};
        ratepool_key b1 org=ob server=127.0.0.1:%%PORT_2%% key=$KEY{b1}
                     fallback=1;
        ratepool_key o1 org=oo server=127.0.0.1:%%PORT_1%% key=$KEY{o1}
                     provider=openai fallback=2;
    }

    upstream steady {
        ratepool zone=llm overload=5s;
        ratepool_key a2 org=oa2 server=127.0.0.1:%%PORT_1%% key=$KEY{a2};
        ratepool_key b2 org=ob2 server=127.0.0.1:%%PORT_2%% key=$KEY{b2}
                     fallback=1;
    }

    upstream eager {
        ratepool zone=llm overload=0;
        ratepool_key a3 org=oa3 server=127.0.0.1:%%PORT_1%% key=$KEY{a3};
        ratepool_key b3 org=ob3 server=127.0.0.1:%%PORT_2%% key=$KEY{b3}
                     fallback=1;
    }

    ratepool_workspace team;
    ratepool_client team ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location /steady/v1/ {
            rewrite ^/steady(/.*)\$ \$1 break;
            ratepool_pass http://steady;
        }

        location /eager/v1/ {
            rewrite ^/eager(/.*)\$ \$1 break;
            ratepool_pass http://eager;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF2

$t->run;

sub served { map { scalar @{ $_->log } } $direct, $other }
sub keys_of { Ratepool::Test::by_name($t->status->{pools}[0]{keys}) }

my @codes = map { $t->messages(token => $TOKEN)->{status} } 1 .. 4;
is(join(',', @codes), '200,200,200,200', 'four requests');
is(join(',', served()), '4,0', 'all to the preferred provider');

$direct->script($KEY{a1}, [ { status => 529 } ]);
my $r = $t->messages(token => $TOKEN);
is($r->{status}, 200, 'a 529 from the preferred provider is hidden');
is(join(',', served()), '5,1', 'the request went to the fallback provider');

my $keys = keys_of();
is($keys->{a1}{state}, 'ok', 'its key does not cool down');
is($keys->{a1}{cooldown_ms}, 0, 'nor does its org');

is($t->messages(token => $TOKEN)->{status}, 200, 'the next request');
is(join(',', served()), '5,2',
    'goes to the fallback while the overloaded server rests');

sleep 2.2;
$t->messages(token => $TOKEN);
is(join(',', served()), '6,2', 'then back to the preferred provider');

# every preferred key cooling: the fallback provider takes the requests
$direct->script($KEY{a1}, [ { status => 429, retry_after => '30' } ]);
@codes = map { $t->messages(token => $TOKEN)->{status} } 1 .. 3;
is(join(',', @codes), '200,200,200', 'the preferred org at its limit');
is(join(',', served()), '7,5', 'the fallback provider serves meanwhile');

# the fallback overloaded too: the 529 goes out, never to another dialect
$direct->reset;
$other->reset;
$other->script($KEY{b1}, [ { status => 529 } ]);
sleep 2.2;
$r = $t->messages(token => $TOKEN);
is($r->{status}, 529,
    'the preferred provider cooling and the fallback overloaded: 529');
ok(!grep({ ($_->{headers}{authorization} // '') =~ /\Q$KEY{o1}\E/ }
         @{ $direct->log }), 'the OpenAI key was not tried');
is(keys_of()->{b1}{cooldown_ms}, 0, 'and no org cools down for a 529');
like($t->error_log, qr/key "a1" got 529, server "127\.0\.0\.1:\d+" is overloaded and ranks after the others for 2000 ms/,
     'a 529 is logged, with how long its server ranks last');

# how long an overloaded server ranks last is the pool's overload=

$direct->reset;
$other->reset;
$direct->script($KEY{a2}, [ { status => 529 } ]);
$direct->script($KEY{a3}, [ { status => 529 } ]);

is($t->messages(token => $TOKEN, path => "/$_/v1/messages")->{status}, 200,
   "$_: a 529 from the preferred provider is hidden") for qw(steady eager);
is(join(',', served()), '2,2', 'both went to the fallback provider');

sleep 2.2;
$t->messages(token => $TOKEN, path => "/$_/v1/messages") for qw(steady eager);
is(join(',', served()), '3,3',
   'overload=5s: the fallback still, after 2 s; overload=0: back at once');

sleep 3;
$t->messages(token => $TOKEN, path => '/steady/v1/messages');
is(join(',', served()), '4,3', 'overload=5s: back after 5 s');

done_testing;

#!/usr/bin/perl

# Conversations keep their prompt caches warm: each turn of a
# conversation goes to the org that holds its cache while that org has
# room, moves once (for good) when it has not, and is charged there only
# what is new since its last turn.  The mock provider keeps a prompt
# cache per org, with the provider's rules.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use POSIX ();
use Time::HiRes qw(sleep);

use Ratepool::Conversation;
use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(4) }
          qw(a1 b1 c1);
my $TOKEN = 'gw-conv-' . Ratepool::Test::random_hex(4);
my $SMALL = 'gw-small-' . Ratepool::Test::random_hex(4);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => {
        $KEY{a1} => { org => 'org-a', name => 'a1' },
        $KEY{b1} => { org => 'org-b', name => 'b1' },
        $KEY{c1} => { org => 'org-c', name => 'c1' },
    },
    prompt_cache => JSON::PP::true,
    log_body => JSON::PP::false,
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format conv '\$ratepool_conversation \$ratepool_key';

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-a rpm=1000 itpm=1000000 otpm=100000;
        ratepool_org org-b rpm=1000 itpm=1000000 otpm=100000;
        ratepool_org org-c rpm=1000 itpm=1000000 otpm=100000;
        ratepool_key a1 org=org-a server=127.0.0.1:%%PORT_1%% key=$KEY{a1};
        ratepool_key b1 org=org-b server=127.0.0.1:%%PORT_1%% key=$KEY{b1};
        ratepool_key c1 org=org-c server=127.0.0.1:%%PORT_1%% key=$KEY{c1};
    }

    ratepool_workspace team;
    ratepool_workspace small itpm=10000;
    ratepool_client team ${\ $t->token_hash($TOKEN)};
    ratepool_client small ${\ $t->token_hash($SMALL)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
            access_log %%TESTDIR%%/conv.log conv;
        }

        location = /status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub new_conversation { Ratepool::Conversation->new(@_) }

sub turn {
    my ($c, %opt) = @_;
    return $c->turn($t, token => $opt{token} // $TOKEN,
                    headers => $opt{headers});
}

sub orgs_used {
    my ($from) = @_;
    my @log = @{ $mock->log };
    return [ map { $_->{org} } @log[$from .. $#log] ];
}

sub conv_log {
    return [ map { [ split / / ] } split /\n/,
             $t->read_file('conv.log') // '' ];
}

sub org_status {
    my $s = $t->status(path => '/status');
    return { map { $_->{name} => $_ } @{ $s->{pools}[0]{orgs} } };
}

# --- a Claude Code session stays on one org ---------------------------------

my $cc = new_conversation('cc', session => 'session-' . Ratepool::Test::random_hex(4));

my @got = map { turn($cc)->{status} } 1 .. 6;
is_deeply(\@got, [ (200) x 6 ], 'six turns of a Claude Code session');

my $orgs = orgs_used(0);
is(scalar(keys %{ { map { $_ => 1 } @$orgs } }), 1,
   'all went to one org, though the other two had more room')
    or diag explain $orgs;
my $home = $orgs->[0];

my @usage = map { $_->{usage} } @{ $mock->log };
is(scalar(grep { ($_->{cache_read_input_tokens} // 0) > 0 } @usage[1 .. 5]),
   5, 'so every turn after the first read its conversation from the cache');

is_deeply([ map { $_->[0] } @{ conv_log() } ],
          [ 'new', ('home') x 5 ],
          '$ratepool_conversation says new, then home');

# --- an SDK conversation without a session id -------------------------------

my $from = @{ $mock->log };
my $sdk = new_conversation('sdk');
@got = map { turn($sdk)->{status} } 1 .. 5;

is_deeply(\@got, [ (200) x 5 ], 'five turns of a conversation sent by an SDK');
$orgs = orgs_used($from);
is(scalar(keys %{ { map { $_ => 1 } @$orgs } }), 1,
   'recognised by its body alone, it stays on one org too')
    or diag explain $orgs;

# --- new conversations spread ------------------------------------------------

$from = @{ $mock->log };
my @fresh = map { new_conversation("fresh$_", system => "other$_") } 1 .. 3;
turn($_) for @fresh;
turn($_) for @fresh;

$orgs = orgs_used($from);
cmp_ok(scalar(keys %{ { map { $_ => 1 } @$orgs } }), '>=', 2,
       'new conversations are spread over the orgs by their headroom')
    or diag explain $orgs;
is_deeply([ @$orgs[3 .. 5] ], [ @$orgs[0 .. 2] ],
          'and each stays where it began')
    or diag explain $orgs;

# --- what a turn costs at home -----------------------------------------------

# held by the provider for a second, so that the reservation can be seen
my $pid = fork // die "fork: $!";

if ($pid == 0) {
    turn($cc, headers => [ 'x-mock-delay-ms' => 1500 ]);
    POSIX::_exit(0);
}

my ($reserved, $held);

for (1 .. 50) {
    sleep 0.05;
    $held = org_status()->{$home};
    last if $held->{in_flight};
}

$reserved = $held->{reserved_input_tokens};
waitpid $pid, 0;

my $prompt_tokens = int(length($cc->body) / 4);
cmp_ok($held->{in_flight}, '==', 1, 'a turn in flight at home');
cmp_ok($reserved, '<', $prompt_tokens / 4,
       "reserves its home's input tokens for what is new only "
       . "($reserved of its $prompt_tokens)");
cmp_ok($reserved, '>', 500, 'which is more than nothing');

# a workspace of 10000 input tokens a minute: a first turn of 6000 tokens
# is admitted, a fresh conversation of 14000 is not, but the 14000-token
# turns of its own conversation are, at home

my $small = new_conversation('small', system => 'small');
is(turn($small, token => $SMALL)->{status}, 200,
   'a small workspace begins a conversation');
turn($small, token => $SMALL) for 1 .. 2;
sleep 0.5;

my $big = turn($small, token => $SMALL);
is($big->{status}, 200,
   'and goes on with it past the size of its whole input budget, '
   . 'since little of each turn is new');

my $cold = new_conversation('cold', system => 'cold');
push @{ $cold->messages }, @{ $small->messages }[1 .. $#{ $small->messages }];
my $r = turn($cold, token => $SMALL);
is($r->{status}, 400, 'a new conversation of that size is not admitted');
like(eval { decode_json($r->{body})->{error}{message} } // '',
     qr/estimated at \d+ input tokens, more than the 10000/,
     'as its whole prompt would be written');

# --- a home without room: the conversation moves, once ----------------------

$from = @{ $mock->log };
my %org_key = (map { ("org-$_" => "${_}1") } qw(a b c));
$mock->script($KEY{ $org_key{$home} },
              [ { status => 429, retry_after => '30' } ], sticky => 1);

$r = turn($cc);
is($r->{status}, 200, 'a turn whose home answers 429');
my $moved = orgs_used($from);
is($moved->[0], $home, 'was tried at home first');
isnt($moved->[-1], $home, 'and went to another org');
my $new_home = $moved->[-1];

$mock->script($KEY{ $org_key{$home} }, []);
$from = @{ $mock->log };
@got = map { turn($cc)->{status} } 1 .. 3;
is_deeply(\@got, [ (200) x 3 ], 'three more turns');
is_deeply(orgs_used($from), [ ($new_home) x 3 ],
          'stay on the new home, where the cache is now')
    or diag explain orgs_used($from);
my @conv = @{ conv_log() };
is_deeply([ map { $_->[0] } @conv[-4 .. -1] ], [ 'moved', ('home') x 3 ],
          '$ratepool_conversation says moved, then home');

# --- status and Prometheus ---------------------------------------------------

my $status = $t->status(path => '/status');
my %by_org = map { $_->{name} => $_ } @{ $status->{pools}[0]{orgs} };
cmp_ok($by_org{$new_home}{conversations}, '>=', 1,
       'the status counts the conversations an org holds');
cmp_ok($status->{conversations}{homes}, '>=', 6,
       'and the homes the zone remembers');
cmp_ok($status->{conversations}{turns}{home}, '>=', 10,
       'and the turns that went home');
is($status->{conversations}{turns}{moved}, 1, 'and the one that moved');
cmp_ok($by_org{$new_home}{cache_hit_ratio}, '>', 0.5,
       'an org that served whole conversations reads most from its cache');
my ($team) = grep { $_->{name} eq 'team' } @{ $status->{workspaces} };
cmp_ok($team->{cache_hit_ratio}, '>', 0.5,
       'and so does the workspace');

my $metrics = $t->http(port => $t->port(0), path => '/status?format=prometheus')->{body};
like($metrics, qr/^ratepool_org_conversations\{pool="claude",org="\Q$new_home\E"\} [1-9]/m,
     'Prometheus has the conversations of each org');
like($metrics, qr/^ratepool_conversation_turns_total\{placement="moved"\} 1$/m,
     'and the turns by placement');
like($metrics, qr/^ratepool_org_tokens_total\{pool="claude",org="\Q$new_home\E",model="",kind="cache_read"\} [1-9]/m,
     'and the tokens of each org by kind');

$t->stop;
$t->check_log;

done_testing;
